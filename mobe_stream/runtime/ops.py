"""Small shared ops, written to round exactly like the reference implementations."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, round back to x's dtype, then scale (transformers' order of rounding)."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate x) * up x): the dense MLP, shared experts and every routed expert."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm without a weight, in fp32, rounded back (Llama-4's q/k norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
