"""The chunked plan of the Triton backend (benchmarks/NOTES.md, v3): GEMM-shaped kernels per chunk.

Same two passes as the fused kernels, cut into chunks of R anchor rows x C columns of one block
(AP, AA, PP, AN_m). Each chunk is one `tile_kernel` launch, which writes its probabilities as an
R x C matrix in the input dtype, and one `scaled_gemm_kernel` launch, which multiplies that
matrix into an fp32 gradient accumulator. Memory: the chunk matrix and a few R x d / C x d fp32
accumulators, whatever B is.

- Pass 1, row chunks outer: per block and column chunk, W = exp(z - m_t) and the per-(row, tile)
  max m_t and sum; the running max M, sum l (online logsumexp across chunks) and the row-side
  accumulators acc_side = sum_j exp(z_ij - ref) y_hat_j (one for the anchor-row blocks, one for
  PP, each with its own reference max) are updated in torch and the GEMM. Then lse = M + log l and
  the row-side gradients go through the normalisation Jacobian into the gradient buffers.
- Pass 2, column chunks outer (per column input: anchors for AA, positives for AP and PP, each
  negative column): per row chunk, H = exp(z - lse) - [target], then acc_c += H^T (x w / (tau |x|)),
  and the column-side gradient is added into the gradient buffer. No atomics: deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from ...inputs import NORM_EPS
from . import chunked_kernels as CK
from .common import _Problem, interpreting

LN2 = 0.6931471805599453


@dataclass(frozen=True)
class Chunks:
    """Chunk and tile sizes of the chunked plan.

    Attributes:
        rows, columns: R anchor rows x C columns per chunk at most (the chunk matrix is R x C in
            the input dtype: 128 MiB at 8192 x 8192 in bf16). Both are capped by B, and halved
            (the larger first) until the matrix is at most 1/8 of the inputs' bytes or 4 Mi
            entries, so small batches stay inside issue 3's memory bound.
        tile_m, tile_n, tile_k: tile of `tile_kernel` (BLOCK_M x BLOCK_N, BLOCK_K features a step).
        gemm_m, gemm_n, gemm_k: tile of `scaled_gemm_kernel`; gemm_k must divide tile_n.
        tile_warps, gemm_warps, stages: launch options on a GPU (the interpreter ignores them).
    All tile sizes are powers of two >= 16.
    """

    rows: int = 8192
    columns: int = 8192
    # 128 x 64 x 64 tiles and 128 x 128 x 64 GEMM tiles, 8 warps: the largest whose sm_90 builds
    # spill nothing (benchmarks/NOTES.md, v3); 128 x 128 tiles spill 48-80 B.
    tile_m: int = 128
    tile_n: int = 64
    tile_k: int = 64
    gemm_m: int = 128
    gemm_n: int = 128
    gemm_k: int = 64
    tile_warps: int = 8
    gemm_warps: int = 8
    stages: int = 3

    def __post_init__(self) -> None:
        for name in ("tile_m", "tile_n", "tile_k", "gemm_m", "gemm_n", "gemm_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"chunk tile size {name}={v} must be a power of two >= 16")
        if self.tile_n % self.gemm_k:
            raise ValueError(f"gemm_k={self.gemm_k} must divide tile_n={self.tile_n}")
        if self.rows < 1 or self.columns < 1:
            raise ValueError(f"chunk rows={self.rows} and columns={self.columns} must be >= 1")


# The chunked plan under the interpreter: 16-wide tiles, chunks of 64 x 64.
INTERPRETER_CHUNKS = Chunks(rows=64, columns=64, tile_m=16, tile_n=16, tile_k=16, gemm_m=16, gemm_n=16, gemm_k=16)


def default_chunks() -> Chunks:
    return INTERPRETER_CHUNKS if interpreting() else Chunks()


@dataclass
class _Block:
    """One logit block: its row input (rows x_shift + i) and its column input (rows j)."""

    x: Tensor
    gx: Tensor
    norms_x: Tensor
    gnorms_x: Tensor
    x_shift: int
    y: Tensor
    gy: Tensor
    norms_y: Tensor
    gnorms_y: Tensor
    gids_y: Tensor  # the column input's guide-row ids (exact ties)
    ties: Tensor  # (B,) the rows' tie codes 2 * tie id + decision (exact ties)
    n_cols: int
    is_target: bool
    row_side: str  # "a": the anchor-row accumulator, "p": the PP accumulator
    column_source: int  # the column input: 0 anchors, 1 positives, 2 + m negative m


def _blocks(problem: _Problem) -> list[_Block]:
    B, P, o = problem.B, problem.P, problem.options
    a, p, ga, gp = problem.a, problem.p, problem.ga, problem.gp
    norms, gnorms, gids = problem.norms, problem.gnorms, problem.gids
    na, np_, ga_n, gp_n = norms[:B], norms[B : B + P], gnorms[:B], gnorms[B : B + P]
    ids_a, ids_p = gids[:B], gids[B : B + P]
    tie_a, tie_p = problem.ties[:B], problem.ties[B:]  # the anchor-row blocks' and PP's tie codes
    anchor_rows = (a, ga, na, ga_n, 0)
    blocks = [_Block(*anchor_rows, p, gp, np_, gp_n, ids_p, tie_a, P, True, "a", 1)]
    if o.contrast_anchors:
        blocks.append(_Block(*anchor_rows, a, ga, na, ga_n, ids_a, tie_a, B, False, "a", 0))
    if o.contrast_positives:
        blocks.append(_Block(p, gp, np_, gp_n, o.offset, p, gp, np_, gp_n, ids_p, tie_p, P, False, "p", 1))
    for m in range(problem.k):
        lo, hi = B + P + m * P, B + P + (m + 1) * P
        n_m, gn_m = problem.n[m], problem.gn[m]
        blocks.append(
            _Block(*anchor_rows, n_m, gn_m, norms[lo:hi], gnorms[lo:hi], gids[lo:hi], tie_a, P, False, "a", 2 + m)
        )
    return blocks


def _jacobian_(x: Tensor, norm: Tensor, v: Tensor) -> Tensor:
    """v := (v - x_hat (x_hat . v)) / max(|x|, eps), in place (fp32 v): the gradient through
    x -> x / max(|x|, eps); below eps the norm is the constant eps and the projection drops."""
    n = norm.clamp_min(NORM_EPS)[:, None]
    x_hat = x.float() / n  # a new tensor: x.float() is x itself for fp32 inputs
    proj = torch.linalg.vecdot(x_hat, v).unsqueeze(1)
    proj.masked_fill_(n <= NORM_EPS, 0.0)
    return v.sub_(x_hat.mul_(proj)).div_(n)


# Tiles per chunk row at most: `chunk_stats_kernel` holds a row's tile statistics at once (and the
# tile kernel's grid, (R / tile_m, C / tile_n), must stay within CUDA's 65535 in its second dimension).
MAX_CHUNK_TILES = 1024


def stats_blocks(tiles_per_row: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_T) of `chunk_stats_kernel` for chunk rows of `tiles_per_row` tiles (at most
    MAX_CHUNK_TILES): a row's tiles in one block, 2048 entries a program (16 a thread, no spill)."""
    block_t = triton.next_power_of_2(tiles_per_row)
    return max(1, 2048 // block_t), block_t


def _chunk_shape(problem: _Problem, chunks: Chunks) -> tuple[int, int]:
    """(R, C): the configured chunk, capped by the problem and by 1/8 of the inputs' bytes."""
    rows, cols = min(chunks.rows, problem.B), min(chunks.columns, max(problem.B, problem.P))
    cols = min(cols, MAX_CHUNK_TILES * chunks.tile_n)
    inputs = (problem.a, problem.p, problem.n, problem.ga, problem.gp, problem.gn)
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    cap = max(4 << 20, input_bytes // 8 // problem.a.element_size())
    while rows * cols > cap:
        if rows >= cols:
            rows = max(chunks.tile_m, rows // 2)
        else:
            cols = max(chunks.tile_n, cols // 2)
    return rows, cols


def _pow2(exponent: Tensor) -> Tensor:
    """2^exponent, exactly for integer-valued exponents (0 for -inf)."""
    return torch.ldexp(torch.ones_like(exponent), exponent)


def _pow2_split(x: Tensor) -> tuple[Tensor, Tensor]:
    """(m, e) with x = m * 2^e, |m| <= 1 and e an integer (0 where x is 0)."""
    e = torch.where(x != 0, torch.ceil(torch.log2(x.abs())), torch.zeros_like(x))
    return torch.ldexp(x, -e), e


class _Launcher:
    """The two kernels with the problem's fixed arguments bound."""

    def __init__(self, problem: _Problem, chunks: Chunks, flags: dict):
        self.problem, self.chunks, self.flags = problem, chunks, flags
        o = problem.options
        self.d, self.dg = problem.a.shape[1], problem.ga.shape[1]
        self.scalars = (self.d, self.dg, o.offset, 1.0 / o.temperature)
        device, dtype = problem.a.device, problem.a.dtype
        rows, cols = _chunk_shape(problem, chunks)
        self.w = torch.empty((rows, cols), device=device, dtype=dtype)
        tiles = triton.cdiv(cols, chunks.tile_n)
        self.tile_max = torch.empty((rows, tiles), device=device, dtype=torch.float32)
        self.tile_sum = torch.empty_like(self.tile_max)
        self.tile_exp = torch.empty_like(self.tile_max)
        self.row_scale = torch.empty_like(self.tile_max)
        self.alpha = torch.empty(rows, device=device, dtype=torch.float32)
        self.below_peak = dtype == torch.float16

    def stats(self, nr: int, nc: int, big: Tensor, total: Tensor, ref: Tensor | None) -> None:
        """Pass 1's online-softmax step after a chunk of nr rows x nc columns: updates big, total
        (and ref), and with ref (gradients wanted) writes self.row_scale and self.alpha for the GEMM."""
        tiles = triton.cdiv(nc, self.chunks.tile_n)
        block_r, block_t = stats_blocks(self.tile_max.shape[1])
        CK.chunk_stats_kernel[(triton.cdiv(nr, block_r),)](
            self.tile_max, self.tile_sum, self.tile_exp, self.tile_max.stride(0),
            big, total, ref if ref is not None else big, self.row_scale, self.alpha, nr, tiles,
            WITH_GRAD=ref is not None, BLOCK_R=block_r, BLOCK_T=block_t,
        )  # fmt: skip

    def tiles(self, blk: _Block, mode: int, r0: int, nr: int, c0: int, nc: int, lse: Tensor, target: Tensor,
              row_coef: Tensor | None = None, write: bool = True) -> None:  # fmt: skip
        c, p = self.chunks, self.problem
        grid = (triton.cdiv(nr, c.tile_m), triton.cdiv(nc, c.tile_n))
        CK.tile_kernel[grid](
            blk.x, blk.x.stride(0), blk.gx, blk.gx.stride(0), blk.norms_x, blk.gnorms_x, blk.x_shift,
            blk.y, blk.y.stride(0), blk.gy, blk.gy.stride(0), blk.norms_y, blk.gnorms_y, blk.gids_y,
            blk.ties, p.thr, lse, target, r0, nr, c0, nc,
            self.w, self.w.stride(0), self.tile_max, self.tile_sum, self.tile_exp, self.tile_max.stride(0),
            row_coef if row_coef is not None else lse,
            *self.scalars,
            MODE=mode, IS_TARGET_BLOCK=blk.is_target, WRITE_W=write,
            BLOCK_M=c.tile_m, BLOCK_N=c.tile_n, BLOCK_K=c.tile_k,
            num_warps=c.tile_warps, num_stages=c.stages, **self.flags,
        )  # fmt: skip

    def gemm(self, out: Tensor, m: int, k: int, transposed: bool, b: Tensor, b_row0: int, *,
             k_scale: Tensor | None = None, alpha: Tensor | None = None,
             row_scale: Tensor | None = None) -> None:  # fmt: skip
        """out (m x d, fp32) = alpha * out + (W[:m, :k] or H[:k, :m]^T, scaled) @ b[b_row0 : b_row0 + k].
        The scales are powers of two."""
        c = self.chunks
        grid = (triton.cdiv(m, c.gemm_m), triton.cdiv(self.d, c.gemm_n))
        dummy = self.tile_max
        rs = row_scale if row_scale is not None else dummy
        peak = dummy
        if self.below_peak:  # fp16: a power of two at least every scale product
            peak = torch.ones(1, device=out.device)
            if row_scale is not None:
                peak = peak * row_scale.amax().clamp_min(1e-30)
            if k_scale is not None:
                peak = peak * k_scale.amax().clamp_min(1e-30)
        CK.scaled_gemm_kernel[grid](
            out, out.stride(0), self.w, self.w.stride(0), b, b.stride(0), b_row0,
            alpha if alpha is not None else dummy, rs, rs.stride(0), k_scale if k_scale is not None else dummy, peak,
            m, self.d, k,
            A_TRANSPOSED=transposed, HAS_ALPHA=alpha is not None, HAS_ROW_SCALE=row_scale is not None,
            HAS_K_SCALE=k_scale is not None, BELOW_PEAK=self.below_peak,
            TILE=c.tile_n, BLOCK_M=c.gemm_m, BLOCK_N=c.gemm_n, BLOCK_K=c.gemm_k,
            num_warps=c.gemm_warps, num_stages=c.stages, **self.flags,
        )  # fmt: skip


def run_chunked(problem: _Problem, weight: Tensor, with_grad: bool, chunks: Chunks, flags: dict):
    """Pass 1 (and, with_grad, pass 2) in chunks. Returns lse, the target logits and the gradients
    (anchor, positive, (k, P, d) negatives) or None, like the fused plan's `_run_passes`.

    Pass 1 keeps its running max in log2 units and in whole powers of two (the tiles' q_t), so every
    rescale is an exact power of two."""
    B, P, k, d = problem.B, problem.P, problem.k, problem.a.shape[1]
    dev, o = problem.a.device, problem.options
    inv_temp = 1.0 / o.temperature
    blocks = _blocks(problem)
    run = _Launcher(problem, chunks, flags)
    R, C = run.w.shape
    lse = torch.empty(B, device=dev, dtype=torch.float32)
    target = torch.empty_like(lse)
    grads = grad_n = None
    if with_grad:
        grad_n = torch.zeros((k, P, d), device=dev, dtype=problem.a.dtype)
        grads = [torch.zeros((B, d), device=dev, dtype=problem.a.dtype), torch.zeros_like(problem.p), *grad_n.unbind(0)]
    sides = ("a", "p") if o.contrast_positives else ("a",)
    minus_inf = float("-inf")

    # Pass 1: row chunks.
    for r0 in range(0, B, R):
        nr = min(R, B - r0)
        big = torch.full((nr,), minus_inf, device=dev)  # running max, log2 units, integer-valued
        total = torch.zeros(nr, device=dev)  # sum of exp(z) / 2^big over all entries but the target
        acc = {side: torch.zeros((nr, d), device=dev) for side in sides} if with_grad else {}
        # Each accumulator's reference (log2 units); -inf while it is empty (so the first rescale is 0, never inf).
        ref = {side: torch.full((nr,), minus_inf, device=dev) for side in sides}
        for blk in blocks:
            for c0 in range(0, blk.n_cols, C):
                nc = min(C, blk.n_cols - c0)
                run.tiles(blk, 0, r0, nr, c0, nc, lse, target, write=with_grad)
                side = blk.row_side
                run.stats(nr, nc, big, total, ref[side] if with_grad else None)
                if with_grad:
                    tiles = triton.cdiv(nc, chunks.tile_n)
                    run.gemm(acc[side], nr, nc, False, blk.y, c0, alpha=run.alpha[:nr],
                             row_scale=run.row_scale[:nr, :tiles])  # fmt: skip
        # `total` (times 2^big) sums every entry but the target, which is never masked: joined here
        # in log space, since the target may exceed all the others by far (lse finite either way).
        others = (big + torch.log2(total)) * LN2  # log of the others' sum; -inf if there are none
        row_lse = torch.logaddexp(others, target[r0 : r0 + nr])
        lse[r0 : r0 + nr] = row_lse
        if with_grad:
            scale = {side: torch.exp(ref[side] * LN2 - row_lse) for side in sides}  # acc units -> P
            _row_side_gradients(problem, weight, acc, scale, torch.exp(others - row_lse), r0, nr, inv_temp, grads)
    if not with_grad:
        return lse, target, None

    # Pass 2: column chunks of each column input.
    sources: dict[int, list[_Block]] = {}
    for blk in blocks:
        sources.setdefault(blk.column_source, []).append(blk)
    w_over_tau = weight * inv_temp
    # H's row factor w_i / (tau |x_i|) = coef * 2^kappa (coef in H, 2^kappa in the GEMM), for all B
    # rows of each row input at once: per chunk these are slices, not launches.
    row_factors = {}
    for blk in blocks:
        if blk.row_side not in row_factors:  # the row input: anchors ("a") or positives ("p")
            x_norms = blk.norms_x[blk.x_shift : blk.x_shift + B].clamp_min(NORM_EPS)
            coef, kappa = _pow2_split(w_over_tau / x_norms)
            row_factors[blk.row_side] = (coef, _pow2(kappa))
    for source, group in sources.items():
        y, norms_y, n_cols = group[0].y, group[0].norms_y, group[0].n_cols
        for c0 in range(0, n_cols, C):
            nc = min(C, n_cols - c0)
            acc = torch.zeros((nc, d), device=dev)
            for blk in group:
                coef, k_scale = row_factors[blk.row_side]
                for r0 in range(0, B, R):
                    nr = min(R, B - r0)
                    rows = slice(r0, r0 + nr)
                    run.tiles(blk, 1, r0, nr, c0, nc, lse, target, row_coef=coef[rows])
                    run.gemm(acc, nc, nr, True, blk.x, blk.x_shift + r0, k_scale=k_scale[rows])
            grad = grads[source][c0 : c0 + nc]
            grad.copy_(_jacobian_(y[c0 : c0 + nc], norms_y[c0 : c0 + nc], acc).add_(grad))
    return lse, target, (grads[0], grads[1], grad_n)


def _row_side_gradients(problem, weight, acc, scale, not_target, r0, nr, inv_temp, grads) -> None:
    """Row-side gradients of anchor rows r0 + [0, nr) through the normalisation, into grads:
    d a_hat_i = w_i/tau (sum_{j != target} P_ij y_hat_j - (1 - P_target) p_hat_{o+i}) over AP, AA,
    AN; d p_hat_{o+i} = w_i/tau sum_j P_ij p_hat_j over PP, with P_ij = acc weight * scale[side]
    and 1 - P_target = `not_target` (the other entries' share of the sum)."""
    o, B = problem.options.offset, problem.B
    rows = slice(r0, r0 + nr)
    own = slice(o + r0, o + r0 + nr)  # anchor i's positive o + i
    w = weight[rows] * inv_temp
    norms_a, norms_p = problem.norms[:B], problem.norms[B : B + problem.P]
    own_p = problem.p[own]
    d_a = acc["a"].mul_((w * scale["a"])[:, None])
    d_a.addcmul_(own_p.float(), (-w * not_target / norms_p[own].clamp_min(NORM_EPS))[:, None])
    grads[0][rows] = _jacobian_(problem.a[rows], norms_a[rows], d_a)
    if problem.options.contrast_positives:
        d_p = acc["p"].mul_((w * scale["p"])[:, None])
        grads[1][own] = _jacobian_(own_p, norms_p[own], d_p)
