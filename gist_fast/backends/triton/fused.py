"""The fused plan of the Triton backend (``backend="triton"``): launches the two passes of
`fused_kernels` (pass 1 per anchor-row tile, pass 2 per column tile of each column input).

Programs are persistent; each keeps its fp32 gradient accumulator in a scratch slab of
``programs x BLOCK x d``, so memory beyond the inputs and their gradients is that scratch and a few
fp32 vectors of length B, whatever B is. The autograd glue is in `backend`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from . import fused_kernels as K
from .common import _kernel_flags, _Problem, interpreting


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


def run_fused(problem: _Problem, weight: Tensor, with_grad: bool, blocks: Blocks):
    """Pass 1 (and, with_grad, pass 2) of the fused plan with tiles `blocks`, weights (B,) fp32.
    Returns lse, the target logits and the gradients (anchor, positive, (k, P, d) negatives) or None."""
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

