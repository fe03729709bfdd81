"""Matmul precision of the solver's step: fp32, tf32 or bf16 operands, always fp32 accumulation.

Only the large batched products (A·M, M·Mᵀ, M·Wᵀ and their backward) take the precision; the
master copies of B and α, the Adam moments, the mixing, the activation and the Cholesky solve stay
fp32. On an H100 the dense peaks are 67 (fp32), 494 (tf32) and 989 (bf16) TFLOP/s, so the
precision decides whether a Kimi-K2 projection takes minutes or hours.

- fp32: plain fp32 matmuls (tf32 explicitly off on CUDA).
- tf32: CUDA tensor cores with tf32 inputs (10-bit mantissa), fp32 accumulation and output.
- bf16: bf16 inputs, fp32 accumulation and fp32 output (cuBLAS with `out_dtype`): a bf16 *output*
  would round the Gram matrix M·Mᵀ to 8 bits, enough to make it indefinite and the Cholesky fail.
On a CPU (no tf32 unit; bf16 kernels there round their output) both are emulated exactly: the
operands are rounded as the hardware rounds them and multiplied in fp32. The error cost of a
precision is therefore measured the same on any machine; on a CPU the emulation is never faster
than fp32, which is why `--precision auto` is fp32 there.

The hand-written step (als.py) goes further under bf16: its large intermediates (the targets'
batch, the mixed basis, the residual, the gradients) are *held* in bf16 (`work_dtype`), each made
once in the form the products read (`operand`), instead of fp32 tensors that every product casts
again: half the bytes of every elementwise pass and no cast passes (cost.step_traffic_bytes). The
products keep fp32 accumulation; `product` picks the output dtype (fp32 for the Gram matrix and
the gradients that are summed, bf16 for the tensors that are operands of the next product), and
`residual_` forms W - A·M in the GEMM's fp32 epilogue, rounded once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("fp32", "tf32", "bf16")
# devices whose matmuls take `out_dtype` (bf16 operands, fp32 result; torch >= 2.8): CUDA, and meta,
# where the tests check that those calls bind with the installed torch (no GPU in CI). An older
# torch takes the emulation everywhere (same numbers, fp32 matmul speed).
_HAS_OUT_DTYPE = all(hasattr(getattr(torch.ops.aten, op), overload)
                     for op, overload in (("mm", "dtype"), ("bmm", "dtype"), ("addmm", "dtype_out")))
OUT_DTYPE_DEVICES = ("cuda", "meta") if _HAS_OUT_DTYPE else ()


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 with the low 13 mantissa bits rounded off (round to nearest even), as tf32 inputs are."""
    i = x.contiguous().view(torch.int32)
    bias = ((i >> 13) & 1) + 0xFFF
    rounded = (i + bias) & ~0x1FFF
    keep = ~torch.isfinite(x)  # NaN/Inf pass through unchanged
    return torch.where(keep, x, rounded.view(torch.float32))


class Precision:
    def __init__(self, name: str = "fp32", device: torch.device | str = "cpu"):
        if name not in PRECISIONS:
            raise ValueError(f"unknown precision {name!r}; use one of {', '.join(PRECISIONS)}")
        self.name = name
        self.device = torch.device(device)
        self._emulate_tf32 = name == "tf32" and self.device.type != "cuda"

    def bmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b for batches of fp32 matrices, in this precision, fp32 result (differentiable)."""
        if self.name == "bf16":
            return _Bf16Bmm.apply(a, b)
        if self._emulate_tf32:
            return torch.bmm(_Tf32Round.apply(a), _Tf32Round.apply(b))
        return torch.bmm(a, b)

    @property
    def work_dtype(self) -> torch.dtype:
        """Dtype of the hand-written step's large intermediates: bf16 under bf16 (each is a bf16
        operand of the next product anyway), else fp32."""
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        """x in the form a product of this precision reads (made once, reused by every product)."""
        if self.name == "bf16":
            return x.to(torch.bfloat16)
        return round_to_tf32(x) if self._emulate_tf32 else x

    def product(self, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """a @ b of two operands (2-D or batched 3-D), fp32 accumulation, result in `out_dtype`. Off
        CUDA the operands are widened and multiplied in fp32, then rounded once (what cuBLAS does)."""
        return _matmul_out(a, b, out_dtype)

    def residual_(self, W: torch.Tensor, A: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """W - A·M into W's buffer (the residual overwrites the batch's targets). fp32/tf32: the
        product, then the subtraction. bf16 (W, M bf16 operands): one GEMM whose fp32 epilogue
        subtracts from W and rounds once, so no fp32 temporary of the batch's size exists."""
        if W.dtype == torch.float32:
            return W.sub_(self.bmm(A, M))
        return self.baddbmm_(W, A, M, alpha=-1.0)

    def residual_split_(self, W: torch.Tensor, A: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """residual_ for a step whose A must not be rounded once to bf16 (a calibrated fit: its
        weighted least-squares A is large and cancels, so bf16(A)·M misses W by as much as the fit's
        own error). A is carried as two bf16 parts, hi + lo (~16 mantissa bits), in ONE GEMM over a
        doubled inner dimension, [hi | lo] · [M; M]: both parts are subtracted in the fp32
        accumulator and R is rounded once, into W's buffer. Costs one product more than residual_
        and a copy of M; fp32/tf32 steps take residual_ (their A is fp32 already)."""
        if W.dtype == torch.float32:
            return self.residual_(W, A, M)
        hi = A.to(torch.bfloat16)
        parts = torch.cat((hi, torch.sub(A, hi).to(torch.bfloat16)), dim=2)  # A - hi in fp32 (promotion)
        return self.baddbmm_(W, parts, torch.cat((M, M), dim=1), alpha=-1.0)

    def baddbmm_(self, C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """C += alpha · a @ b in C's buffer and dtype: fp32 accumulation, one rounding into C; a and b
        are taken in this precision's operand form. Off CUDA a bf16 C is emulated in fp32."""
        a, b = self.operand(a), self.operand(b)
        if C.dtype == torch.float32 or C.device.type != "cpu":
            return C.baddbmm_(a.to(C.dtype), b.to(C.dtype), alpha=alpha)
        return C.copy_(torch.baddbmm(C.float(), a.float(), b.float(), alpha=alpha))

    def accumulate_(self, C: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """C += a @ b for an fp32 C and two operands (B's gradient, summed over the batches)."""
        if a.dtype == C.dtype:
            return C.addmm_(a, b)
        if C.device.type in OUT_DTYPE_DEVICES:  # cuBLAS accumulates into C in its epilogue
            return torch.addmm(C, a, b, out_dtype=C.dtype, out=C)
        return C.addmm_(a.float(), b.float())

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Sets CUDA's fp32 matmul mode for the duration of a step (and restores it)."""
        if self.device.type != "cuda":
            yield
            return
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.name == "tf32"
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old


class _Tf32Round(torch.autograd.Function):
    """Rounding in the forward pass; the gradient is rounded too (the hardware rounds the operands
    of the backward products instead: the same error level, not the same bits)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return round_to_tf32(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return round_to_tf32(g)


def _matmul_out(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b (2-D or batched 3-D) with fp32 accumulation and the result in `out_dtype`: cuBLAS does
    it natively (bf16 operands, fp32 or bf16 result); elsewhere the widened operands are multiplied
    in fp32 and rounded once (the same numbers up to summation order)."""
    if a.device.type not in OUT_DTYPE_DEVICES:
        return torch.matmul(a.float(), b.float()).to(out_dtype)
    if a.dtype == out_dtype:
        return torch.matmul(a, b)
    return (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out_dtype=out_dtype)


class _Bf16Bmm(torch.autograd.Function):
    """bf16-input batched matmul with its backward written out (both products bf16-input too), so
    autograd never depends on a derivative formula for cuBLAS's out_dtype overload; the same code
    runs on every device, which lets CPU tests exercise the CUDA path's logic."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        ctx.save_for_backward(a16, b16)
        return _matmul_out(a16, b16)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a16, b16 = ctx.saved_tensors
        g16 = g.to(torch.bfloat16)
        ga = _matmul_out(g16, b16.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        gb = _matmul_out(a16.transpose(1, 2), g16) if ctx.needs_input_grad[1] else None
        return ga, gb
