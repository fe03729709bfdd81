"""KV cache: per layer, a tuple of tensors concatenated along the sequence axis.

GQA layers store (k, v) [B, kv_heads, T, head_dim]; MLA layers store the compressed latents
(normalised kv [B, T, kv_lora_rank], rotated shared key [B, T, rope_dim]), 10-50x smaller.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int):
        self.layers: list[tuple[torch.Tensor, ...] | None] = [None] * num_layers
        self.length = 0  # tokens already cached (the position of the next token)

    def update(self, layer: int, *new: torch.Tensor, seq_dim: int) -> tuple[torch.Tensor, ...]:
        """Append `new` (same structure every call) and return the full cached tensors."""
        old = self.layers[layer]
        full = new if old is None else tuple(torch.cat([o.to(n.device), n], dim=seq_dim) for o, n in zip(old, new, strict=True))
        self.layers[layer] = full
        return full

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.layers if ts for t in ts)


def causal_mask(q_len: int, k_len: int, device: torch.device, window: int | None = None,
                chunk: int | None = None) -> torch.Tensor:
    """Boolean [q_len, k_len], True = may attend. Queries are the last q_len of k_len positions.
    window: the last `window` positions only; chunk: positions of the query's chunk only (Llama-4)."""
    q = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    ok = k <= q
    if window is not None:
        ok &= k > q - window
    if chunk is not None:
        ok &= k // chunk == q // chunk
    return ok
