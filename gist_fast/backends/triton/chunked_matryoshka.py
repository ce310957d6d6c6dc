"""The chunked Triton plan's Matryoshka path: every prefix dim of the student in one two-pass sweep.

``sum_k w_k L_k``, L_k the GIST loss of the student embeddings cut to their first m_k features
(cosine after truncation) against the full guide (benchmarks/NOTES.md, "Matryoshka"). The chunks and
kernels are `chunked`'s; what changes is the tile kernel, `matryoshka_tile_kernel`, which per
tile forms the guide's keep mask once and sweeps the student features once in ascending segments
(0:m_1, m_1:m_2, ...), taking each dim's logits from the running dots and the dim's own prefix norms.

- Pass 1: per dim its W and tile statistics, online logsumexp, target logit, row-side accumulators
  (R x m_k) and a GEMM over its first m_k features.
- Pass 2: per feature segment one H, summed over the dims that cover the segment, and one GEMM over
  the segment's features; the normalisation's projections per dim and column come from the tile
  kernel (`_column_gradients` assembles them).

Each dim's gradients go through its own normalisation and are summed in one fp32 buffer per input.
Memory stays linear in B: K chunk matrices and pass 2's fp32 scratch (the chunk is shrunk so that
they fit the plain plan's cap), K (B,) vectors per statistic, fp32 gradient buffers.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ...inputs import NORM_EPS
from . import chunked_kernels as CK
from .chunked import LN2, MAX_CHUNK_TILES, Chunks, _blocks, _jacobian_, _pow2, _pow2_split, stats_blocks
from .common import _Problem, _row_dots


class _Prefixes:
    """The dims ascending with their weights, the segment bounds for the kernel, and the prefix
    norms |x[:m_k]| of every student row (K x (B + P + kP), laid out like `_Problem.norms`)."""

    def __init__(self, problem: _Problem) -> None:
        options = problem.options
        pairs = sorted(zip(options.matryoshka_dims, options.matryoshka_weights, strict=True))
        self.dims = [m for m, _ in pairs]
        self.weights = [w for _, w in pairs]
        dev = problem.a.device
        self.bounds = torch.tensor([0, *self.dims], device=dev, dtype=torch.int32)
        starts = [0, *self.dims[:-1]]
        inputs = [problem.a, problem.p, *problem.n.unbind(0)]
        # Squared norms segment by segment (fp32, as the plain plan's norms), summed into prefixes.
        segments = torch.stack(
            [
                torch.cat([_row_dots(t[:, a:b], t[:, a:b]) for t in inputs])
                for a, b in zip(starts, self.dims, strict=True)
            ]
        )
        self.norms = segments.cumsum_(0).sqrt_().contiguous()

    def __len__(self) -> int:
        return len(self.dims)


def _chunk_shape(problem: _Problem, chunks: Chunks, n_dims: int) -> tuple[int, int]:
    """(R, C) as `chunked._chunk_shape`, with the K chunk matrices and pass 2's fp32 scratch
    (K x R x C) together under its cap (1/8 of the inputs' bytes, at least 4 Mi entries' worth)."""
    rows, cols = min(chunks.rows, problem.B), min(chunks.columns, max(problem.B, problem.P))
    cols = min(cols, MAX_CHUNK_TILES * chunks.tile_n)
    inputs = (problem.a, problem.p, problem.n, problem.ga, problem.gp, problem.gn)
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    size = problem.a.element_size()
    cap = max(4 << 20, input_bytes // 8 // size) * size // (n_dims * (size + 4))
    while rows * cols > cap and (rows > chunks.tile_m or cols > chunks.tile_n):
        if rows >= cols:
            rows = max(chunks.tile_m, rows // 2)
        else:
            cols = max(chunks.tile_n, cols // 2)
    return rows, cols


class _Launcher:
    """The Matryoshka tile kernel, the chunk statistics and the GEMM with the problem bound."""

    def __init__(self, problem: _Problem, prefixes: _Prefixes, chunks: Chunks, flags: dict):
        self.problem, self.prefixes, self.chunks, self.flags = problem, prefixes, chunks, flags
        o = problem.options
        self.scalars = (problem.a.shape[1], problem.ga.shape[1], o.offset, 1.0 / o.temperature)
        device, dtype = problem.a.device, problem.a.dtype
        K = len(prefixes)
        rows, cols = _chunk_shape(problem, chunks, K)
        self.w = torch.empty((K, rows, cols), device=device, dtype=dtype)
        tiles = triton.cdiv(cols, chunks.tile_n)
        self.tile_max = torch.empty((K, rows, tiles), device=device, dtype=torch.float32)
        self.tile_sum = torch.empty_like(self.tile_max)
        self.tile_exp = torch.empty_like(self.tile_max)
        self.row_scale = torch.empty((rows, tiles), device=device, dtype=torch.float32)
        self.alpha = torch.empty(rows, device=device, dtype=torch.float32)
        self.scratch = self.col_dot = self.alpha  # pass 2's, made by `pass2_buffers`
        self.below_peak = dtype == torch.float16
        if self.w.numel() >= 2**31 or self.tile_max.numel() >= 2**31 or K * problem.B >= 2**31:
            raise ValueError("the Triton Matryoshka path needs its per-dim buffers under 2^31 entries")

    def pass2_buffers(self) -> None:
        """Pass 2's fp32 scratch (each dim's H term, laid out as self.w) and projection sums."""
        K, rows, cols = self.w.shape
        self.scratch = torch.empty((K, rows, cols), device=self.w.device, dtype=torch.float32)
        self.col_dot = torch.empty((K, triton.cdiv(rows, self.chunks.tile_m), cols), device=self.w.device)

    def tiles(self, blk, mode: int, r0: int, nr: int, c0: int, nc: int, lse: Tensor, target: Tensor,
              row_coef: Tensor | None = None, k_scale: Tensor | None = None, write: bool = True) -> None:  # fmt: skip
        """Every dim's W (mode 0) or every segment's H (mode 1) of the chunk rows r0 + [0, nr) x
        columns c0 + [0, nc)."""
        c, p, pre = self.chunks, self.problem, self.prefixes
        norms = pre.norms
        B = p.B
        pn_x = norms[:, blk.norm_lo_x :]
        pn_y = norms[:, blk.norm_lo_y :]
        grid = (triton.cdiv(nr, c.tile_m), triton.cdiv(nc, c.tile_n))
        coef = row_coef if row_coef is not None else lse
        CK.matryoshka_tile_kernel[grid](
            blk.x, blk.x.stride(0), blk.gx, blk.gx.stride(0), pn_x, blk.gnorms_x, blk.x_shift,
            blk.y, blk.y.stride(0), blk.gy, blk.gy.stride(0), pn_y, blk.gnorms_y, blk.gids_y, norms.stride(0),
            pre.bounds, blk.ties, p.thr, lse, target, B, r0, nr, c0, nc,
            self.w, self.w.stride(1), self.w.stride(0),
            self.tile_max, self.tile_sum, self.tile_exp, self.tile_max.stride(1), self.tile_max.stride(0),
            coef, coef.stride(0), k_scale if k_scale is not None else lse, self.scratch, self.col_dot,
            self.col_dot.stride(0) if mode == 1 else 0, self.col_dot.stride(1) if mode == 1 else 0,
            *self.scalars,
            NUM_DIMS=len(pre), MODE=mode, IS_TARGET_BLOCK=blk.is_target, WRITE_W=write,
            BLOCK_M=c.tile_m, BLOCK_N=c.tile_n, BLOCK_K=c.tile_k,
            num_warps=c.tile_warps, num_stages=c.stages, **self.flags,
        )  # fmt: skip

    def stats(self, k: int, nr: int, nc: int, big: Tensor, total: Tensor, ref: Tensor | None) -> None:
        """Dim k's online-softmax step after a chunk (`chunked._Launcher.stats`)."""
        tiles = triton.cdiv(nc, self.chunks.tile_n)
        block_r, block_t = stats_blocks(self.tile_max.shape[2])
        CK.chunk_stats_kernel[(triton.cdiv(nr, block_r),)](
            self.tile_max[k], self.tile_sum[k], self.tile_exp[k], self.tile_max.stride(1),
            big, total, ref if ref is not None else big, self.row_scale, self.alpha, nr, tiles,
            WITH_GRAD=ref is not None, BLOCK_R=block_r, BLOCK_T=block_t,
        )  # fmt: skip

    def gemm(self, k: int, out: Tensor, m: int, kk: int, transposed: bool, b: Tensor, b_row0: int, *,
             k_scale: Tensor | None = None, alpha: Tensor | None = None,
             row_scale: Tensor | None = None) -> None:  # fmt: skip
        """out (m x n, fp32, n = out's width: the dim) = alpha * out + (dim k's W[:m, :kk] or
        H[:kk, :m]^T, scaled) @ b[b_row0 : b_row0 + kk, :n]. The scales are powers of two."""
        c = self.chunks
        n = out.shape[1]
        a = self.w[k]
        grid = (triton.cdiv(m, c.gemm_m), triton.cdiv(n, c.gemm_n))
        dummy = self.alpha
        rs = row_scale if row_scale is not None else self.row_scale
        peak = dummy
        if self.below_peak:  # fp16: a power of two at least every scale product
            peak = torch.ones(1, device=out.device)
            if row_scale is not None:
                peak = peak * row_scale.amax().clamp_min(1e-30)
            if k_scale is not None:
                peak = peak * k_scale.amax().clamp_min(1e-30)
        CK.scaled_gemm_kernel[grid](
            out, out.stride(0), a, a.stride(0), b, b.stride(0), b_row0,
            alpha if alpha is not None else dummy, rs, rs.stride(0), k_scale if k_scale is not None else dummy, peak,
            m, n, kk,
            A_TRANSPOSED=transposed, HAS_ALPHA=alpha is not None, HAS_ROW_SCALE=row_scale is not None,
            HAS_K_SCALE=k_scale is not None, BELOW_PEAK=self.below_peak,
            TILE=c.tile_n, BLOCK_M=c.gemm_m, BLOCK_N=c.gemm_n, BLOCK_K=c.gemm_k,
            num_warps=c.gemm_warps, num_stages=c.stages, **self.flags,
        )  # fmt: skip


def _norm_offsets(problem: _Problem, blocks) -> None:
    """Give each block the offsets of its row and column inputs in the norm layout (B + P + kP)."""
    B, P = problem.B, problem.P
    for blk in blocks:
        blk.norm_lo_x = B if blk.row_side == "p" else 0  # PP rows are positives (x_shift added in the kernel)
        blk.norm_lo_y = (0, B)[blk.column_source] if blk.column_source < 2 else B + P + (blk.column_source - 2) * P


def run_chunked_matryoshka(
    problem: _Problem, weight: Tensor, with_grad: bool, chunks: Chunks, flags: dict
) -> tuple[Tensor, tuple | None]:
    """Pass 1 (and, with_grad, pass 2) for every dim of ``problem.options.matryoshka_dims``.

    Returns the per-row losses ``sum_k w_k max(lse_k - z_k,target, 0)`` (B,) and the gradients
    (anchor, positive, (k, P, d) negatives; fp32, d the kernels' width) of ``sum_i weight_i loss_i``,
    or None without with_grad."""
    B, P, k_neg, d = problem.B, problem.P, problem.k, problem.a.shape[1]
    dev, o = problem.a.device, problem.options
    inv_temp = 1.0 / o.temperature
    prefixes = _Prefixes(problem)
    K, dims = len(prefixes), prefixes.dims
    blocks = _blocks(problem)
    _norm_offsets(problem, blocks)
    run = _Launcher(problem, prefixes, chunks, flags)
    _, R, C = run.w.shape
    lse = torch.empty((K, B), device=dev, dtype=torch.float32)
    target = torch.empty_like(lse)
    grads = grad_n = None
    if with_grad:
        grad_n = torch.zeros((k_neg, P, d), device=dev)
        grads = [torch.zeros((B, d), device=dev), torch.zeros((P, d), device=dev), *grad_n.unbind(0)]
    sides = ("a", "p") if o.contrast_positives else ("a",)
    minus_inf = float("-inf")

    # Pass 1: row chunks; per dim its running max, sum, accumulators and their references.
    for r0 in range(0, B, R):
        nr = min(R, B - r0)
        big = torch.full((K, nr), minus_inf, device=dev)
        total = torch.zeros((K, nr), device=dev)
        acc = [{s: torch.zeros((nr, m), device=dev) for s in sides} for m in dims] if with_grad else []
        ref = [{s: torch.full((nr,), minus_inf, device=dev) for s in sides} for _ in dims]
        for blk in blocks:
            for c0 in range(0, blk.n_cols, C):
                nc = min(C, blk.n_cols - c0)
                run.tiles(blk, 0, r0, nr, c0, nc, lse, target, write=with_grad)
                side = blk.row_side
                tiles = triton.cdiv(nc, chunks.tile_n)
                for k in range(K):
                    run.stats(k, nr, nc, big[k], total[k], ref[k][side] if with_grad else None)
                    if with_grad:
                        run.gemm(k, acc[k][side], nr, nc, False, blk.y, c0, alpha=run.alpha[:nr],
                                 row_scale=run.row_scale[:nr, :tiles])  # fmt: skip
        others = (big + torch.log2(total)) * LN2  # (K, nr): log of the others' sum per dim
        row_lse = torch.logaddexp(others, target[:, r0 : r0 + nr])
        lse[:, r0 : r0 + nr] = row_lse
        if with_grad:
            for k in range(K):
                scale = {s: torch.exp(ref[k][s] * LN2 - row_lse[k]) for s in sides}
                not_target = torch.exp(others[k] - row_lse[k])
                _row_side_gradients(problem, prefixes, k, weight, acc[k], scale, not_target, r0, nr, inv_temp, grads)
    weights = torch.tensor(prefixes.weights, device=dev, dtype=torch.float32)
    losses = ((lse - target).clamp_min_(0.0) * weights[:, None]).sum(0)
    if not with_grad:
        return losses, None

    # Pass 2: column chunks of each column input; one tile launch gives every feature segment's
    # H (summed over the dims covering it) and one GEMM per segment, over that segment's features.
    sources: dict[int, list] = {}
    for blk in blocks:
        sources.setdefault(blk.column_source, []).append(blk)
    # Dim k's row factor f_ki = w_k weight_i / (tau |x_i[:m_k]|) and per segment s a power of two
    # 2^kappa_si >= max_{k >= s} |f_ki| (the dims covering it), per row input.
    row_factors = {}
    for blk in blocks:
        if blk.row_side not in row_factors:
            lo = blk.norm_lo_x + blk.x_shift
            x_norms = prefixes.norms[:, lo : lo + B].clamp_min(NORM_EPS)
            factor = (weights[:, None] * weight[None, :] * inv_temp / x_norms).contiguous()
            covering = factor.abs().flip(0).cummax(0).values.flip(0)
            _, kappa = _pow2_split(covering)
            row_factors[blk.row_side] = (factor, _pow2(kappa), _pow2(-kappa).contiguous())
    run.pass2_buffers()
    starts, top = [0, *dims[:-1]], dims[-1]
    for source, group in sources.items():
        first = group[0]
        y, n_cols, lo_y = first.y, first.n_cols, first.norm_lo_y
        for c0 in range(0, n_cols, C):
            nc = min(C, n_cols - c0)
            acc = torch.zeros((nc, top), device=dev)  # segment s in columns starts[s]:dims[s]
            projection = torch.zeros((K, nc), device=dev)
            for blk in group:
                factor, two_kappa, inv_two_kappa = row_factors[blk.row_side]
                for r0 in range(0, B, R):
                    nr = min(R, B - r0)
                    run.tiles(blk, 1, r0, nr, c0, nc, lse, target, row_coef=factor[:, r0:],
                              k_scale=inv_two_kappa[:, r0:])  # fmt: skip
                    projection += run.col_dot[:, : triton.cdiv(nr, chunks.tile_m), :nc].sum(1)
                    for seg, (a, b) in enumerate(zip(starts, dims, strict=True)):
                        run.gemm(seg, acc[:, a:b], nc, nr, True, blk.x[:, a:], blk.x_shift + r0,
                                 k_scale=two_kappa[seg, r0 : r0 + nr])  # fmt: skip
            _column_gradients(grads[source][c0 : c0 + nc], y[c0 : c0 + nc], prefixes, lo_y + c0, acc, projection)
    return losses, (grads[0], grads[1], grad_n)


def _row_side_gradients(problem, prefixes, k, weight, acc, scale, not_target, r0, nr, inv_temp, grads) -> None:
    """Dim k's row-side gradients of anchor rows r0 + [0, nr), added into the fp32 grads
    (`chunked._row_side_gradients` for the prefix: dim k's norms, features and weight)."""
    o, B, m = problem.options.offset, problem.B, prefixes.dims[k]
    rows = slice(r0, r0 + nr)
    own = slice(o + r0, o + r0 + nr)
    w = weight[rows] * (inv_temp * prefixes.weights[k])
    norms_a, norms_p = prefixes.norms[k, :B], prefixes.norms[k, B : B + problem.P]
    own_p = problem.p[own, :m]
    d_a = acc["a"].mul_((w * scale["a"])[:, None])
    d_a.addcmul_(own_p.float(), (-w * not_target / norms_p[own].clamp_min(NORM_EPS))[:, None])
    grads[0][rows, :m].add_(_jacobian_(problem.a[rows, :m], norms_a[rows], d_a))
    if problem.options.contrast_positives:
        d_p = acc["p"].mul_((w * scale["p"])[:, None])
        grads[1][own, :m].add_(_jacobian_(own_p, norms_p[own], d_p))


def _column_gradients(grad: Tensor, y: Tensor, prefixes: _Prefixes, lo: int, acc: Tensor, projection: Tensor) -> None:
    """Add the column side of pass 2 through every dim's normalisation into `grad` (fp32, rows
    of `y`, whose prefix norms start at column `lo` of prefixes.norms):

        sum_k J_k(v_k),  J_k(v) = (v - y_hat^k (y_hat^k . v)) / n_k,  v_k = sum_i H^k_ij x_i[:m_k],

    n_k = max(|y[:m_k]|, eps) (projection dropped below eps). Segment s of `acc` holds
    n_s sum_{k >= s} v_k / n_k there and `projection[k]` is y_hat^k . v_k (the kernel's sums over
    the rows), so segment s of the gradient is acc_s / n_s - y[seg s] sum_{k >= s} projection_k / n_k^2."""
    raw = prefixes.norms[:, lo : lo + y.shape[0]]
    n = raw.clamp_min(NORM_EPS)
    q = (projection / (n * n)).masked_fill_(raw <= NORM_EPS, 0.0)
    suffix = q.flip(0).cumsum(0).flip(0)  # suffix[s] = sum over k >= s
    start = 0
    for s, m in enumerate(prefixes.dims):
        grad[:, start:m].add_(acc[:, start:m] / n[s][:, None]).sub_(y[:, start:m].float() * suffix[s][:, None])
        start = m
