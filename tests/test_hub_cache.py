"""Models in the local Hugging Face cache: snapshot symlinks into blobs/, hub ids, no network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from mobe_stream.synth import make_tiny_moe

from .helpers import run_cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _as_hub_cache(model: Path, cache: Path, repo_id: str) -> Path:
    """Lay `model` out as huggingface_hub does: blobs by content hash, a snapshot of symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for f in sorted(model.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        os.symlink(Path("..") / ".." / "blobs" / digest, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture()
def hub(tmp_path):
    cache = tmp_path / "hub"
    snap = _as_hub_cache(make_tiny_moe(tmp_path / "plain", family="qwen3_moe"), cache, "Org/Tiny-MoE")
    return cache, snap


def test_snapshot_symlinks_into_blobs_are_accepted(hub, tmp_path):
    _, snap = hub
    out = tmp_path / "out"
    run_cli("compress", str(snap), "--out", str(out), "--num-bases", "4", "--rank", "16", "--steps", "2", "--quiet",
            check=True)
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()  # side files copied


def test_a_symlink_leaving_the_cache_tree_is_still_refused(hub, tmp_path):
    _, snap = hub
    outside = tmp_path / "elsewhere.safetensors"
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    shard = next(iter(index["weight_map"].values()))
    shutil.copyfile(snap / shard, outside)
    (snap / shard).unlink()
    os.symlink(outside, snap / shard)
    proc = run_cli("inspect", str(snap))
    assert proc.returncode == 2 and "resolves outside the model directory" in proc.stderr, proc.stderr


def test_hub_id_resolves_in_the_local_cache_without_network(hub):
    cache, _ = hub
    env = {"HF_HUB_CACHE": str(cache)}
    proc = run_cli("inspect", "Org/Tiny-MoE", "--json", extra_env=env, check=True)
    assert json.loads(proc.stdout)["family"] == "qwen3_moe"
    proc = run_cli("inspect", "Org/Tiny-MoE", "--revision", COMMIT, "--json", extra_env=env, check=True)
    proc = run_cli("inspect", "Org/Tiny-MoE", "--revision", "v2", extra_env=env)
    assert proc.returncode == 2 and "no snapshot for revision 'v2'" in proc.stderr, proc.stderr
    proc = run_cli("inspect", "Org/Absent", extra_env=env)
    assert proc.returncode == 2 and "huggingface-cli download Org/Absent" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
