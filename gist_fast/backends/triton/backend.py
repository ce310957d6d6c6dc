"""The Triton backend's entry points: `gist_loss_triton` (``backend="triton"``, the fused plan by
default) and `gist_loss_triton_chunked` (``backend="triton_chunked"``), and the autograd glue both
plans share.

For ``reduction="mean"``/``"sum"`` both passes run in the forward call, which returns the loss
and saves the student gradients; backward only scales them by the incoming scalar (as Liger's
fused linear cross-entropy does). For ``"none"`` each row has its own incoming weight, so the
forward runs pass 1 without gradients and backward runs both passes with the weights. The passes
themselves: `fused` (the fused plan, `Blocks`), `chunked` and `chunked_matryoshka` (the chunked
plan, `Chunks`); the input layout both share: `common`.

Under ``TRITON_INTERPRET=1`` the kernels run on the CPU (slowly) with fp32 dots for bf16 inputs,
whose dot the interpreter gets wrong (triton 3.9 on a CPU multiplies bf16 bit patterns).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...inputs import GISTInputs, GISTOptions
from ..common import one_pass_matryoshka, reduce, refuse_double_backward, row_weight
from ..matryoshka import compose_per_dimension
from .chunked import Chunks, default_chunks, run_chunked
from .chunked_matryoshka import run_chunked_matryoshka
from .common import _kernel_flags, _prepare, _Problem, interpreting
from .fused import Blocks, default_blocks, run_fused

RETAIN_GRAPH_ERROR = (
    "gist_fast: the Triton backend computes the gradients of reduction='mean'/'sum' in the forward "
    "pass and hands them to the first backward; backward through the same loss twice "
    "(retain_graph=True) is not supported: compute the loss again"
)


def _run_passes(problem: _Problem, weight: Tensor, with_grad: bool, blocks: Blocks | Chunks):
    """Pass 1 (and, with_grad, pass 2) of the fused plan (`Blocks`) or the chunked one (`Chunks`).
    Returns lse, the target logits and the gradients (anchor, positive, (k, P, d) negatives) or None."""
    if isinstance(blocks, Chunks):
        return run_chunked(problem, weight, with_grad, blocks, _kernel_flags(problem))
    return run_fused(problem, weight, with_grad, blocks)


def _losses_and_gradients(problem: _Problem, weight: Tensor, with_grad: bool, blocks: Blocks | Chunks):
    """The per-row losses (B,) and, with_grad, the gradients of sum_i weight_i loss_i: one plain
    loss by `_run_passes`, or with ``matryoshka_dims`` (the chunked plan only) every prefix dim's in
    one sweep (`chunked_matryoshka`)."""
    if problem.options.matryoshka_dims is not None:
        return run_chunked_matryoshka(problem, weight, with_grad, blocks, _kernel_flags(problem))
    lse, target, grads = _run_passes(problem, weight, with_grad, blocks)
    # The exact loss is >= 0 (lse includes the target); clamping only removes round-off.
    return (lse - target).clamp_min(0.0), grads


def _row_weights(options: GISTOptions, B: int, device: torch.device) -> Tensor:
    """w_i of G = (P - 1[target]) w_i / tau: 1/B for mean, 1 for sum."""
    return torch.full((B,), row_weight(options, B), device=device, dtype=torch.float32)


def _split(grads: tuple[Tensor, Tensor, Tensor], d: int) -> list[Tensor]:
    """The gradients per student input, at the inputs' feature dim d (the kernels' may be padded)."""
    grad_a, grad_p, grad_n = grads
    split = [grad_a, grad_p, *grad_n.unbind(0)]
    return split if grad_a.shape[1] == d else [g[:, :d] for g in split]


class _GISTTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, options: GISTOptions, num_negatives: int, blocks: Blocks | Chunks, *tensors: Tensor):
        k = num_negatives
        student, guide = tensors[: 2 + k], tensors[2 + k :]
        problem = _prepare(student, guide, options)
        B = problem.B
        needs_grad = any(ctx.needs_input_grad[3 : 5 + k])
        eager_grad = needs_grad and options.reduction != "none"
        weight = _row_weights(options, B, problem.a.device)
        losses, grads = _losses_and_gradients(problem, weight, eager_grad, blocks)
        loss = reduce(losses, options.reduction)

        ctx.options, ctx.k, ctx.blocks = options, k, blocks
        ctx.dtypes = [t.dtype for t in student]
        ctx.deferred = needs_grad and not eager_grad
        # The gradients are kept on ctx, not saved: backward hands them over and drops its own
        # reference, so autograd can take them as .grad without a copy (no second B x d buffer).
        ctx.grads = _split(grads, student[0].shape[1]) if eager_grad else None
        if ctx.deferred:
            ctx.save_for_backward(*tensors)
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # Refuse create_graph=True up front (once_differentiable would only fail one step later,
        # and not at all when grad_out does not require grad).
        refuse_double_backward()
        k = ctx.k
        if ctx.deferred:
            tensors = ctx.saved_tensors
            problem = _prepare(tensors[: 2 + k], tensors[2 + k :], ctx.options)
            weight = grad_out.detach().to(torch.float32).contiguous()
            _, grads = _losses_and_gradients(problem, weight, True, ctx.blocks)
            grads = _split(grads, tensors[0].shape[1])
        else:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError(RETAIN_GRAPH_ERROR)
            scale = float(grad_out)
            if scale != 1.0:  # loss.backward() passes 1: nothing to do
                for g in grads:
                    g.mul_(scale)
        student = [
            g.to(dtype) if ctx.needs_input_grad[3 + i] else None
            for i, (g, dtype) in enumerate(zip(grads, ctx.dtypes, strict=True))
        ]
        return (None, None, None, *student, *([None] * (2 + k)))


def gist_loss_triton(inputs: GISTInputs, options: GISTOptions, *, blocks: Blocks | Chunks | None = None) -> Tensor:
    """Fused two-pass GIST loss in Triton (CUDA, or the CPU interpreter with TRITON_INTERPRET=1).

    Exactly the loss of docs/loss.md (as ``backend="reference"``), with memory linear in B: the
    B x N logits are never materialised. fp32, fp16 and bf16 inputs are read as stored when their
    features are contiguous (any row stride; otherwise a contiguous copy is made); dots accumulate
    in fp32, lse and the target term are fp32, gradients come back in each input's dtype. Float64
    inputs go to the tiled PyTorch backend, which is exact in float64.
    Double backward is refused.

    Args:
        inputs: validated embeddings: anchor (B, d), positive (P, d), k negatives (P, d) each,
            guide_anchor (B, dg), guide_positive (P, dg), k guide negatives (P, dg).
        options: validated options (temperature, margin, contrast flags, reduction, offset).
        blocks: the plan: `Blocks` (the fused kernels; default `GPU_BLOCKS`, or
            `INTERPRETER_BLOCKS` under the interpreter) or `Chunks` (the chunked GEMM-shaped kernels,
            benchmarks/NOTES.md v3).

    Returns:
        The loss: a float32 scalar, or a (B,) vector for ``reduction="none"``.

    Example:
        >>> import torch, gist_fast
        >>> a, p, n = torch.randn(3, 4096, 768, device="cuda", dtype=torch.bfloat16).unbind(0)
        >>> ga, gp, gn = torch.randn(3, 4096, 1024, device="cuda", dtype=torch.bfloat16).unbind(0)
        >>> a.requires_grad_()
        >>> gist_fast.gist_loss(a, p, ga, gp, n, gn, backend="triton").backward()
    """
    tensors = (*inputs.student_tensors, *inputs.guide_tensors)
    if any(t.dtype == torch.float64 for t in tensors):
        from ..torch_tiled import gist_loss_torch

        return gist_loss_torch(inputs, options)
    blocks = blocks or default_blocks()
    if options.matryoshka_dims is not None and not isinstance(blocks, Chunks):
        # The fused plan has no one-pass Matryoshka path: one call per dim (benchmarks/NOTES.md).
        return compose_per_dimension(lambda i, o: gist_loss_triton(i, o, blocks=blocks), inputs, options)
    if inputs.anchor.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, "
            "to run its kernels on the CPU); use backend='torch' on the CPU"
        )
    return _GISTTritonFunction.apply(options, len(inputs.negatives), blocks, *tensors)


# The smallest Matryoshka dim the chunked plan's one-pass path takes for fp16 / bf16 inputs.
SMALLEST_ONE_PASS_DIM_16BIT = 8
HALF_DTYPES = (torch.float16, torch.bfloat16)


@one_pass_matryoshka
def gist_loss_triton_chunked(inputs: GISTInputs, options: GISTOptions) -> Tensor:
    """``backend="triton_chunked"``: the Triton backend with the chunked plan (`Chunks`,
    benchmarks/NOTES.md v3): per chunk of rows x columns, a tile kernel writes the probabilities
    and a Triton GEMM multiplies them into fp32 gradient accumulators. Same loss, dtypes and
    memory bound as ``backend="triton"`` (see `gist_loss_triton` for arguments and returns). With
    ``options.matryoshka_dims`` every prefix dim is computed in one pass (`chunked_matryoshka`: the
    guide mask once per tile, one sweep over the student features), except for fp16 / bf16 inputs
    with a dim below `SMALLEST_ONE_PASS_DIM_16BIT`, which get one call per dim; the fused plan
    always composes one loss per dim.

    Example:
        >>> import torch, gist_fast
        >>> a, p = torch.randn(2, 65536, 768, device="cuda", dtype=torch.bfloat16).unbind(0)
        >>> ga, gp = torch.randn(2, 65536, 1024, device="cuda", dtype=torch.bfloat16).unbind(0)
        >>> a.requires_grad_()
        >>> gist_fast.gist_loss(a, p, ga, gp, backend="triton_chunked").backward()
    """
    chunks = default_chunks()
    dims = options.matryoshka_dims
    if dims is not None and min(dims) < SMALLEST_ONE_PASS_DIM_16BIT and inputs.anchor.dtype in HALF_DTYPES:
        # Pass 2 sums the dims' probability-gradient matrices per feature segment in 16 bits; a 1- or
        # 2-wide prefix (cosines of +-1, saturated rows) has large terms that cancel only after that
        # rounding (bf16, d = 16, dims (16, 1): 0.19-1.9 of the largest gradient, composed 0.005;
        # dims >= 4: <= 0.013). Below the floor, one call per dim, each exact to bf16's tolerance.
        return compose_per_dimension(lambda i, o: gist_loss_triton(i, o, blocks=chunks), inputs, options)
    return gist_loss_triton(inputs, options, blocks=chunks)

