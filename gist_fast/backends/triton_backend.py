"""The Triton backend: launches the two passes of `triton_kernels` and wraps them for autograd.

For ``reduction="mean"``/``"sum"`` both passes run in the forward call, which returns the loss
and saves the student gradients; backward only scales them by the incoming scalar (as Liger's
fused linear cross-entropy does). For ``"none"`` each row has its own incoming weight, so the
forward runs pass 1 without gradients and backward runs both passes with the weights. Memory
beyond the inputs and their gradients: a few fp32 vectors of length B + (k+1) P and a fixed
fp32 scratch of ``programs x BLOCK x d``.

Under ``TRITON_INTERPRET=1`` the kernels run on the CPU (slowly) with fp32 dots for bf16 inputs,
whose dot the interpreter gets wrong (triton 3.9 on a CPU multiplies bf16 bit patterns).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from ..inputs import NORM_EPS, GISTInputs, GISTOptions
from . import triton_kernels as K
from .common import one_pass_matryoshka, reduce, refuse_double_backward, row_weight
from .matryoshka import compose_per_dimension
from .ties import guide_row_ids, masked_at_tie
from .triton_chunked import Chunks, run_chunked
from .triton_matryoshka import run_chunked_matryoshka

RETAIN_GRAPH_ERROR = (
    "gist_fast: the Triton backend computes the gradients of reduction='mean'/'sum' in the forward "
    "pass and hands them to the first backward; backward through the same loss twice "
    "(retain_graph=True) is not supported: compute the loss again"
)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and the number of persistent programs per pass.

    A program owns `owned` rows of its pass (pass 1: anchor rows; pass 2: columns of one input),
    keeps their fp32 gradient accumulator in its scratch (owned x d) and streams tiles of `streamed`
    rows of the other side past them. Pass 1 tiles are owned x streamed (BLOCK_M x BLOCK_N), pass 2
    tiles streamed x owned: the scratch traffic per tile is fixed by `owned`, the work grows with
    `streamed` (benchmarks/NOTES.md, v2b).

    Attributes:
        owned, streamed: the two sides of a tile; k: features per dot step (BLOCK_K); all powers of
            two >= 16 (a GPU needs every dot dimension >= 16).
        programs: persistent programs per launch (None: one per SM on a GPU, 3 when interpreting).
        warps: warps per program on a GPU (the interpreter ignores it).
        stages: software-pipelining stages of the dot loops on a GPU (the interpreter ignores it).
    """

    owned: int = 64
    streamed: int = 128
    k: int = 32
    programs: int | None = None
    warps: int = 8
    stages: int = 3

    def __post_init__(self) -> None:
        for name in ("owned", "streamed", "k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"block size {name}={v} must be a power of two >= 16")

    def row_pass(self) -> dict[str, int]:
        """BLOCK_M, BLOCK_N, BLOCK_K of pass 1 (anchor rows owned)."""
        return {"BLOCK_M": self.owned, "BLOCK_N": self.streamed, "BLOCK_K": self.k}

    def column_pass(self) -> dict[str, int]:
        """BLOCK_M, BLOCK_N, BLOCK_K of pass 2 (columns owned)."""
        return {"BLOCK_M": self.streamed, "BLOCK_N": self.owned, "BLOCK_K": self.k}


# 64 owned x 128 streamed, 32 features per dot step, 8 warps, 3 stages: the largest tiles whose sm_90
# build (triton 3.9) spills nothing in either pass (benchmarks/NOTES.md); bench_triton_gpu.py sweeps others.
GPU_BLOCKS = Blocks(64, 128, 32, warps=8, stages=3)
INTERPRETER_BLOCKS = Blocks(16, 16, 16, programs=3)


# The chunked plan under the interpreter: 16-wide tiles, chunks of 64 x 64.
INTERPRETER_CHUNKS = Chunks(rows=64, columns=64, tile_m=16, tile_n=16, tile_k=16, gemm_m=16, gemm_n=16, gemm_k=16)


def default_chunks() -> Chunks:
    return INTERPRETER_CHUNKS if interpreting() else Chunks()


def default_blocks() -> Blocks:
    return INTERPRETER_BLOCKS if interpreting() else GPU_BLOCKS


def _num_programs(blocks: Blocks, tiles: int, device: torch.device) -> int:
    if blocks.programs is not None:
        wanted = blocks.programs
    elif device.type == "cuda":
        wanted = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        wanted = 3
    return max(1, min(wanted, tiles))


def _common_dtype(tensors: tuple[Tensor, ...]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _stack(tensors: tuple[Tensor, ...], like: Tensor) -> Tensor:
    """The k (P, d) tensors as one (k, P, d) tensor; a view when they already are one (as when
    `negatives` was passed as a (k, P, d) tensor), else a copy. k = 0 gives an empty tensor."""
    if not tensors:
        return like.new_empty((0, *like.shape))
    first = tensors[0]
    if len(tensors) == 1:
        return first.unsqueeze(0)
    step = tensors[1].data_ptr() - first.data_ptr()
    same_layout = all(
        t.stride() == first.stride() and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        for t in tensors
    )
    if same_layout and step % first.element_size() == 0 and step > 0:
        step_elems = step // first.element_size()
        if all(t.data_ptr() - first.data_ptr() == m * step for m, t in enumerate(tensors)):
            return first.as_strided((len(tensors), *first.shape), (step_elems, *first.stride()))
    return torch.stack(tensors)


def _row_dots(x: Tensor, y: Tensor) -> Tensor:
    """sum_k x[i, k] y[i, k] in fp32, one Triton program per 16 rows."""
    rows, dim = x.shape
    out = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows:
        block_r, block_k = 16, 64 if not interpreting() else 16
        K.row_dots_kernel[(triton.cdiv(rows, block_r),)](
            x, y, out, rows, dim, x.stride(0), y.stride(0), BLOCK_R=block_r, BLOCK_K=block_k
        )
    return out


def _norms(tensors: list[Tensor]) -> Tensor:
    """|x_i| of every row of every tensor, concatenated (fp32; sqrt with IEEE rounding)."""
    return torch.cat([_row_dots(t, t) for t in tensors]).sqrt_()


@dataclass
class _Problem:
    """The inputs laid out for the kernels."""

    a: Tensor
    p: Tensor
    n: Tensor  # (k, P, d)
    ga: Tensor
    gp: Tensor
    gn: Tensor  # (k, P, dg)
    norms: Tensor  # (B + P + kP,) fp32
    gnorms: Tensor
    gids: Tensor  # (B + P + kP,) int32: the guide rows' ids (exact ties, `ties`)
    ties: Tensor  # (2B,) int32: tie codes 2 * tie id + decision, of the anchor-row blocks then PP
    thr: Tensor  # (B,) fp32
    options: GISTOptions

    @property
    def B(self) -> int:  # noqa: N802
        return self.a.shape[0]

    @property
    def P(self) -> int:  # noqa: N802
        return self.p.shape[0]

    @property
    def k(self) -> int:
        return self.n.shape[0]

    def shape_args(self) -> tuple:
        """Sizes, scalars and row strides, in the order both kernels take them (features are
        contiguous: `_kernel_layout`)."""
        o = self.options
        return (
            self.B,
            self.P,
            self.a.shape[1],
            self.ga.shape[1],
            o.offset,
            self.k,
            1.0 / o.temperature,
            self.a.stride(0),
            self.p.stride(0),
            *self.n.stride()[:2],
            self.ga.stride(0),
            self.gp.stride(0),
            *self.gn.stride()[:2],
        )


# Feature dims and row strides the kernels get are multiples of this many elements: Triton
# specialises an integer argument only on divisibility by 16, and only then can it load a row's
# features with 16-byte vectors and pipeline them (cp.async); benchmarks/NOTES.md, v2a and v3d.
ROW_ALIGN = 16


def padded_width(d: int) -> int:
    """d rounded up to a multiple of ROW_ALIGN: the feature width the kernels run at."""
    return -(-d // ROW_ALIGN) * ROW_ALIGN


def _kernel_layout(t: Tensor) -> Tensor:
    """`t` itself when its features are contiguous and its feature dim and other strides are
    multiples of ROW_ALIGN (every common embedding dim, stored contiguously), else a copy of width
    d rounded up to ROW_ALIGN, zero-filled past d (zeros change no dot and no norm).

    The kernels take the feature stride to be 1 (Triton does not specialise a runtime stride of 1,
    and with an unknown stride every load is a scalar one); an odd d (769, say) would also leave
    them scalar loads, through the row stride and the feature mask. The copy costs O(rows x d) once
    per call; the gradients come back at the padded width, and `_split` cuts them to d."""
    d = t.shape[-1]
    aligned = d % ROW_ALIGN == 0 and t.stride(-1) == 1
    if aligned and all(n <= 1 or s % ROW_ALIGN == 0 for n, s in zip(t.shape[:-1], t.stride()[:-1], strict=True)):
        return t
    padded = t.new_zeros((*t.shape[:-1], padded_width(d)))
    padded[..., :d] = t
    return padded


def _prepare(student: tuple[Tensor, ...], guide: tuple[Tensor, ...], options: GISTOptions) -> _Problem:
    s_dtype, g_dtype = _common_dtype(student), _common_dtype(guide)
    student = tuple(t.detach().to(s_dtype) for t in student)
    guide = tuple(t.detach().to(g_dtype) for t in guide)
    a, p, ga, gp = (_kernel_layout(t) for t in (student[0], student[1], guide[0], guide[1]))
    # The negatives stacked first (a view when they are one tensor already), then laid out once.
    n, gn = _kernel_layout(_stack(student[2:], p)), _kernel_layout(_stack(guide[2:], gp))
    B, o = a.shape[0], options.offset
    norms = _norms([a, p, *n.unbind(0)])
    gnorms = _norms([ga, gp, *gn.unbind(0)])
    # t_i = ga_hat_i . gp_hat_{o+i}, divided like the kernel divides the guide tiles.
    g_own = gnorms[B + o : 2 * B + o].clamp_min(NORM_EPS)
    t = _row_dots(ga, gp[o : o + B]) / (gnorms[:B].clamp_min(NORM_EPS) * g_own)
    gids, ties = _tie_codes(guide, t, options)
    return _Problem(a, p, n, ga, gp, gn, norms, gnorms, gids, ties, options.threshold(t), options)


# Tie codes 2 * id + decision must fit in int32.
MAX_GUIDE_ROWS = 2**30


def _tie_codes(guide: tuple[Tensor, ...], t: Tensor, options: GISTOptions) -> tuple[Tensor, Tensor]:
    """The guide rows' ids (B + P + kP, laid out like the norms) and the anchor rows' tie codes
    2 * tie id + [masked at a tie] (B for the anchor-row blocks: id of gp_{o+i}; B for PP: id of
    ga_i), int32, for the kernels' exact tie rule (`ties`)."""
    total = sum(g.shape[0] for g in guide)
    if total > MAX_GUIDE_ROWS:
        raise ValueError(f"the Triton backend takes at most {MAX_GUIDE_ROWS} guide rows in all; got {total}")
    ids = guide_row_ids(guide)
    B, o = t.shape[0], options.offset
    decision = masked_at_tie(t, options).to(torch.int64)
    codes = torch.cat([2 * ids[1][o : o + B] + decision, 2 * ids[0] + decision])
    return torch.cat(ids).to(torch.int32), codes.to(torch.int32)


def _kernel_flags(problem: _Problem) -> dict:
    dtype = problem.a.dtype
    upcast = interpreting() and (dtype == torch.bfloat16 or problem.ga.dtype == torch.bfloat16)
    return {"UPCAST": upcast, "PRECISION": "ieee"}


def _run_passes(problem: _Problem, weight: Tensor, with_grad: bool, blocks: Blocks | Chunks):
    """Pass 1 (and, with_grad, pass 2) of the fused plan (`Blocks`) or the chunked one (`Chunks`).
    Returns lse, the target logits and the gradients (anchor, positive, (k, P, d) negatives) or None."""
    if isinstance(blocks, Chunks):
        return run_chunked(problem, weight, with_grad, blocks, _kernel_flags(problem))
    B, P, k, d = problem.B, problem.P, problem.k, problem.a.shape[1]
    dev = problem.a.device
    o = problem.options
    lse = torch.empty(B, device=dev, dtype=torch.float32)
    target = torch.empty_like(lse)
    flags = _kernel_flags(problem)
    tensors = (
        *(problem.a, problem.p, problem.n, problem.ga, problem.gp, problem.gn),
        *(problem.norms, problem.gnorms, problem.gids, problem.ties),
    )
    if with_grad:
        grad_a = torch.empty((B, d), device=dev, dtype=problem.a.dtype)
        grad_p = torch.zeros((P, d), device=dev, dtype=problem.a.dtype)
        grad_n = torch.empty((k, P, d), device=dev, dtype=problem.a.dtype)
    else:
        grad_a = grad_p = grad_n = lse  # unused

    programs = _num_programs(blocks, triton.cdiv(B, blocks.owned), dev)
    scratch = torch.empty((programs, 2, blocks.owned, d) if with_grad else (1,), device=dev, dtype=torch.float32)
    K.row_pass_kernel[(programs,)](
        *tensors,
        problem.thr,
        weight,
        lse,
        target,
        grad_a,
        grad_p,
        scratch,
        *problem.shape_args(),
        CONTRAST_ANCHORS=o.contrast_anchors,
        CONTRAST_POSITIVES=o.contrast_positives,
        WITH_GRAD=with_grad,
        **blocks.row_pass(),
        num_warps=blocks.warps,
        num_stages=blocks.stages,
        **flags,
    )
    del scratch
    if not with_grad:
        return lse, target, None

    # Pass 2, one launch per column input: anchors (AA), positives (AP, PP), negatives (AN_m).
    sources = [(1, grad_p, P)]
    if o.contrast_anchors:
        sources.insert(0, (0, grad_a, B))
    if k:
        sources.append((2, grad_n, k * P))
    max_tiles = max(triton.cdiv(rows, blocks.owned) for _, _, rows in sources)
    programs = _num_programs(blocks, max_tiles, dev)
    scratch = torch.empty((programs, blocks.owned, d), device=dev, dtype=torch.float32)
    for source, out, rows in sources:
        K.column_pass_kernel[(min(programs, triton.cdiv(rows, blocks.owned)),)](
            *tensors,
            problem.thr,
            weight,
            lse,
            out,
            scratch,
            *problem.shape_args(),
            SOURCE=source,
            CONTRAST_POSITIVES=o.contrast_positives,
            **blocks.column_pass(),
            num_warps=blocks.warps,
            num_stages=blocks.stages,
            **flags,
        )
    return lse, target, (grad_a, grad_p, grad_n)


def _losses_and_gradients(problem: _Problem, weight: Tensor, with_grad: bool, blocks: Blocks | Chunks):
    """The per-row losses (B,) and, with_grad, the gradients of sum_i weight_i loss_i: one plain
    loss by `_run_passes`, or with ``matryoshka_dims`` (the chunked plan only) every prefix dim's in
    one sweep (`triton_matryoshka`)."""
    if problem.options.matryoshka_dims is not None:
        return run_chunked_matryoshka(problem, weight, with_grad, blocks, _kernel_flags(problem), _row_dots)
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
        from .torch_tiled import gist_loss_torch

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


@one_pass_matryoshka
def gist_loss_triton_chunked(inputs: GISTInputs, options: GISTOptions) -> Tensor:
    """``backend="triton_chunked"``: the Triton backend with the chunked plan (`Chunks`,
    benchmarks/NOTES.md v3): per chunk of rows x columns, a tile kernel writes the probabilities
    and a Triton GEMM multiplies them into fp32 gradient accumulators. Same loss, dtypes and
    memory bound as ``backend="triton"`` (see `gist_loss_triton` for arguments and returns). With
    ``options.matryoshka_dims`` every prefix dim is computed in one pass (`triton_matryoshka`: the
    guide mask once per tile, one sweep over the student features); the fused plan composes one
    loss per dim instead.

    Example:
        >>> import torch, gist_fast
        >>> a, p = torch.randn(2, 65536, 768, device="cuda", dtype=torch.bfloat16).unbind(0)
        >>> ga, gp = torch.randn(2, 65536, 1024, device="cuda", dtype=torch.bfloat16).unbind(0)
        >>> a.requires_grad_()
        >>> gist_fast.gist_loss(a, p, ga, gp, backend="triton_chunked").backward()
    """
    return gist_loss_triton(inputs, options, blocks=default_chunks())
