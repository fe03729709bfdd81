"""Clustered init: balanced sets of similar experts give each basis its SVD sub-group."""

from __future__ import annotations

import pytest
import torch

from mobe_stream.factorize import MoBESpec, init_grouped_svd, relative_error
from mobe_stream.factorize.cluster import balanced_clusters, similarity


def _clustered_experts(E=24, clusters=4, p=16, d=40, seed=0):
    """Experts around `clusters` centres, numbered at random; returns (W, true cluster of each id)."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(clusters, p, d, generator=g)
    label = torch.arange(E) * clusters // E
    W = C[label] + 0.3 * torch.randn(E, p, d, generator=g)
    perm = torch.randperm(E, generator=g)
    return W[perm].contiguous(), label[perm]


def test_similarity_is_symmetric_bounded_and_one_on_the_diagonal():
    W, _ = _clustered_experts()
    S = similarity(W)
    assert torch.allclose(S, S.T) and torch.allclose(S.diagonal(), torch.ones(len(S)), atol=1e-5)
    assert S.min() >= 0 and S.max() <= 1 + 1e-5


@pytest.mark.parametrize("sizes", [[6, 6, 6, 6], [7, 6, 6, 5]])
def test_balanced_clusters_partition_with_exact_sizes_and_find_the_clusters(sizes):
    W, label = _clustered_experts()
    parts = balanced_clusters(similarity(W), sizes)
    assert sorted(torch.cat(parts).tolist()) == list(range(24))
    assert [len(p) for p in parts] == sizes
    if sizes == [6, 6, 6, 6]:
        assert all(len(set(label[p].tolist())) == 1 for p in parts)


def _own_basis_error(W, f) -> float:
    """Error of A_e times the expert's own SVD basis: what the grouping decides (no activation/mixing)."""
    own = f.alpha.argmax(dim=1)
    R = W - torch.bmm(f.A, f.B[0][own])
    return float(R.norm() / W.norm())


def test_clustered_init_beats_index_runs_and_stays_inside_format_groups():
    W, label = _clustered_experts()
    spec = MoBESpec(4, 16)
    paper, clustered = init_grouped_svd(W, spec), init_grouped_svd(W, spec, cluster=True)
    assert _own_basis_error(W, clustered) < 0.8 * _own_basis_error(W, paper)
    assert relative_error(W, clustered) < relative_error(W, paper)
    # the sorted layout is what clustering recovers: the same start error
    order = torch.argsort(label, stable=True)
    assert _own_basis_error(W, clustered) == pytest.approx(_own_basis_error(W[order], init_grouped_svd(W[order], spec)), rel=1e-4)
    two = init_grouped_svd(W, MoBESpec(4, 16, groups=2), cluster=True)
    for e in range(24):  # each expert's own basis (its one-hot logit) is in its own group's bases
        assert two.alpha[e].argmax().item() < 2 and two.alpha[e].sum() == 1
