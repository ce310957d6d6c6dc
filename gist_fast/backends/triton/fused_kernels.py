"""Triton kernels of the fused plan (``backend="triton"``; gradients: docs/loss.md; plan: benchmarks/NOTES.md).

Notation (docs/loss.md): rows are anchors i (PP rows: positives o + i), columns j come from one
input per block (AP: positives, AA: anchors, PP: positives, AN_m: negative column m). Every input
is read as stored (fp32/fp16/bf16, any row stride; features contiguous, which lets Triton pipeline
the loads); cosines are formed from raw dot products and the row norms, so no normalised copy of
any input is made:

    s_ij = (x_i . y_j) / (|x_i| |y_j|)      student, scaled by 1/|.| after the dot
    g_ij = (gx_i . gy_j) / (|gx_i| |gy_j|)  guide, divided with IEEE rounding
    z_ij = s_ij / tau, or -inf where g_ij > thr_i (never for the target j = o + i of AP)

Exact ties (`ties`): where the column's guide-row id equals the row's tie id (the logit's guide pair
is the pair that defines thr_i), the row's exact decision replaces g_ij > thr_i. The ids come as
int32 vectors: `gids` (every guide row, laid out like the norms) and per anchor row a tie code
2 * tie_id + decision (`ties`: B codes for the anchor-row blocks, then B for PP).

- `row_pass_kernel` (pass 1): a program owns BLOCK_M rows and walks every column tile of every
  block: online logsumexp (running max m_i and sum l_i), the target logit, and the row-side
  gradient sums sum_j exp(z_ij - m) y_hat_j (flash-attention's output accumulator). The
  accumulator is BLOCK_M x d, wider than registers for d = 768..4096, so it lives in a small
  fp32 scratch private to the program (one slab per program, reused across its row tiles) and is
  updated BLOCK_K features at a time: no atomics, memory independent of B.
- `column_pass_kernel` (pass 2): a program owns BLOCK_N columns of one input and walks every row
  tile of every block that has those columns, recomputes z, P = exp(z - lse) and
  G = (P - [target]) w_i / tau, and accumulates the column-side gradient sum_i G_ij x_hat_i the
  same way. Deterministic: each output row is written by exactly one program.
- Both passes end by taking their gradient through the normalisation,
  dx = (dx_hat - x_hat (x_hat . dx_hat)) / max(|x|, eps), which is linear, so the row-side part
  (pass 1, stored in the input dtype) and the column-side part (pass 2, added in fp32 to it) can be
  computed apart.
- The tile helpers both plans share (`_dot_tile`, `_logit_tile`, `_load_norms`) and `row_dots_kernel`
  (the norms and the thresholds) are in `shared_kernels`.

Programs are persistent (grid = one per SM, each loops over tiles), so the scratch is
`programs x BLOCK x d` floats whatever B is. Its reads and writes are separated by CTA barriers:
different call sites may map an element to different threads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .shared_kernels import NORM_EPS, _load_norms, _logit_tile


@triton.jit
def _accumulate(
    acc,
    rescale,
    weights,
    y,
    s_y,
    cols,
    col_mask,
    dim,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc[r, :] = acc[r, :] * rescale[r] + sum_c weights[r, c] y[cols[c], :], for the BLOCK_R x dim
    fp32 scratch `acc` (row-major). The weights go to the tensor cores in y's dtype: they are
    divided by their largest magnitude first (and the dot multiplied back) so fp16 cannot overflow."""
    peak = tl.max(tl.max(tl.abs(weights), axis=1), axis=0)
    peak = tl.where(peak > 0, peak, 1.0)
    w = (weights / peak).to(y.dtype.element_ty)
    if UPCAST:
        w = w.to(tl.float32)
    r = tl.arange(0, BLOCK_R)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < dim
        yv = tl.load(y + cols[:, None] * s_y + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            yv = yv.to(tl.float32)
        a_ptr = acc + r[:, None] * dim + ks[None, :]
        a = tl.load(a_ptr, mask=k_mask[None, :], other=0.0)
        a = a * rescale[:, None] + peak * tl.dot(w, yv, input_precision=PRECISION)
        tl.store(a_ptr, a, mask=k_mask[None, :])
    # The scratch is read next (next tile, epilogue) by code whose thread layout may differ:
    # make this program's writes visible to all its threads first (the interpreter cannot show this race).
    tl.debug_barrier()


@triton.jit
def _zero_scratch(acc, dim, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Zero this program's scratch slab; barriers order it after the previous tile's reads and
    before the next reads, which other threads of the program may make."""
    tl.debug_barrier()
    r = tl.arange(0, BLOCK_R)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        tl.store(acc + r[:, None] * dim + ks[None, :], tl.zeros([BLOCK_R, BLOCK_K], tl.float32), mask=ks[None, :] < dim)
    tl.debug_barrier()


@triton.jit
def _store_gradient(
    acc,
    scale,
    x,
    s_x,
    rows,
    row_mask,
    norm_x,
    t,
    s_t,
    t_rows,
    t_coef,
    out,
    out_rows,
    dim,
    HAS_T: tl.constexpr,
    ADD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[out_rows] (+)= J_x(dx_hat) with dx_hat = scale * acc - t_coef * t_hat[t_rows] (the last
    term only when HAS_T) and J_x(v) = (v - x_hat (x_hat . v)) / max(|x|, eps); below eps the
    norm is a constant and J_x(v) = v / eps. `out` is contiguous (rows of `dim`)."""
    r = tl.arange(0, BLOCK_R)
    inv_x = 1.0 / norm_x
    # First sweep: x_hat . dx_hat.
    proj = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (ks[None, :] < dim)
        dx = _gradient_chunk(acc, scale, t, s_t, t_rows, t_coef, r, ks, mask, dim, HAS_T)
        xv = tl.load(x + rows[:, None] * s_x + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        proj += tl.sum(xv * inv_x[:, None] * dx, axis=1)
    proj = tl.where(norm_x > NORM_EPS, proj, 0.0)
    # Second sweep: write (dx_hat - x_hat proj) / |x|.
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (ks[None, :] < dim)
        dx = _gradient_chunk(acc, scale, t, s_t, t_rows, t_coef, r, ks, mask, dim, HAS_T)
        xv = tl.load(x + rows[:, None] * s_x + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        grad = (dx - xv * inv_x[:, None] * proj[:, None]) * inv_x[:, None]
        o_ptr = out + out_rows[:, None] * dim + ks[None, :]
        if ADD:
            grad += tl.load(o_ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_ptr, grad.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _gradient_chunk(acc, scale, t, s_t, t_rows, t_coef, r, ks, mask, dim, HAS_T: tl.constexpr):
    """Features `ks` of dx_hat = scale * acc - t_coef * t[t_rows] (t_coef already holds 1/|t|)."""
    dx = tl.load(acc + r[:, None] * dim + ks[None, :], mask=mask, other=0.0) * scale[:, None]
    if HAS_T:
        tv = tl.load(t + t_rows[:, None] * s_t + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        dx -= t_coef[:, None] * tv
    return dx


# ----------------------------------------------------------------------------------------------
# Pass 1: row blocks
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sweep_columns(
    # rows of this tile (fixed): student and guide inputs, norms, threshold
    x,
    s_x,
    gx,
    s_gx,
    rows,
    x_rows,
    row_mask,
    norm_x,
    gnorm_x,
    thr,
    row_tie,
    # the block's columns
    y,
    s_y,
    gy,
    s_gy,
    norms_y,
    gnorms_y,
    gids_y,
    n_cols,
    # online state
    m_i,
    l_i,
    z_target,
    acc,
    acc_max,
    d,
    dg,
    offset,
    inv_temp,
    IS_TARGET_BLOCK: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One block of pass 1: every column tile of y for the rows of this tile."""
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        cols64 = cols.to(tl.int64)
        norm_y = _load_norms(norms_y, cols, col_mask)
        gnorm_y = _load_norms(gnorms_y, cols, col_mask)
        col_ids = tl.load(gids_y + cols, mask=col_mask, other=-1)
        z, is_target = _logit_tile(
            x, s_x, gx, s_gx, x_rows, norm_x, gnorm_x, y, s_y, gy, s_gy, cols64, norm_y, gnorm_y,
            rows, row_mask, cols, col_mask, thr, row_tie, col_ids, d, dg, offset, inv_temp,
            IS_TARGET_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
        )  # fmt: skip
        # Online logsumexp. A row whose entries so far are all masked keeps m = -inf; `m_safe`
        # keeps exp() away from (-inf) - (-inf).
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp(z - m_safe[:, None])
        if IS_TARGET_BLOCK:
            # The target's share is kept apart (its logit, added to the sum at the end): l and the
            # accumulator hold the other entries only, so the row gradient's target term
            # (1 - P_target) p_hat is formed without cancelling against a rounded P_target.
            z_target += tl.sum(tl.where(is_target, z, 0.0), axis=1)
            p = tl.where(is_target, 0.0, p)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(p, axis=1)
        m_i = m_new
        if WITH_GRAD:
            # acc holds sum_j exp(z_ij - acc_max_i) y_hat_j; bring it to the new max and add this tile.
            _accumulate(
                acc,
                tl.exp(acc_max - m_safe),
                p / norm_y[None, :],
                y,
                s_y,
                cols64,
                col_mask,
                d,
                BLOCK_M,
                BLOCK_K,
                UPCAST,
                PRECISION,
            )
            # -inf while the row has no unmasked entry (acc still 0): a reference of 0 there would
            # make the next rescale exp(0 - m) overflow for logits below -88 (0 * inf = NaN).
            acc_max = m_new
    return m_i, l_i, z_target, acc_max


@triton.jit
def row_pass_kernel(
    a,
    p,
    n,
    ga,
    gp,
    gn,
    norms,
    gnorms,
    gids,
    ties,
    thr_ptr,
    weight_ptr,
    lse_out,
    target_out,
    grad_a,
    grad_p,
    scratch,
    B,
    P,
    d,
    dg,
    offset,
    num_neg,
    inv_temp,
    s_a,
    s_p,
    s_nm,
    s_n,
    s_ga,
    s_gp,
    s_gnm,
    s_gn,
    CONTRAST_ANCHORS: tl.constexpr,
    CONTRAST_POSITIVES: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Pass 1. Writes lse_i and z_{i,target} (fp32) and, WITH_GRAD, the row-side gradients taken
    through the normalisation: grad_a[i] = J_a(w_i/tau (sum_j P_ij y_hat_j - p_hat_{o+i})) over the
    anchor-row blocks (AP, AA, AN_m), grad_p[o+i] = J_p(w_i/tau sum_j P_ij p_hat_j) over PP.

    `norms`/`gnorms` hold |x| of the anchors (B), positives (P) and negatives (num_neg x P), in
    that order, and `gids` the guide rows' ids in that order; `ties` the rows' tie codes (B for
    the anchor-row blocks, then B for PP). Negative m of `n` starts at n + m * s_nm. `scratch` is
    fp32 (programs, 2, BLOCK_M, d)."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    acc_a = scratch + pid.to(tl.int64) * (2 * BLOCK_M * d)
    acc_p = acc_a + BLOCK_M * d
    norms_a, norms_p = norms, norms + B
    gnorms_a, gnorms_p = gnorms, gnorms + B
    for tile in range(pid, tl.cdiv(B, BLOCK_M), num_programs):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < B
        a_rows = rows.to(tl.int64)
        p_rows = a_rows + offset  # anchor i's own positive: rows of PP, target of AP
        thr = tl.load(thr_ptr + rows, mask=row_mask, other=0.0)
        tie_a = tl.load(ties + rows, mask=row_mask, other=0)
        norm_a = _load_norms(norms_a, rows, row_mask)
        gnorm_a = _load_norms(gnorms_a, rows, row_mask)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        z_target = tl.zeros([BLOCK_M], dtype=tl.float32)
        max_a = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        max_p = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        if WITH_GRAD:
            _zero_scratch(acc_a, d, BLOCK_M, BLOCK_K)
            _zero_scratch(acc_p, d, BLOCK_M, BLOCK_K)

        # AP: anchors x positives, the target column o + i never masked.
        m_i, l_i, z_target, max_a = _sweep_columns(
            a, s_a, ga, s_ga, rows, a_rows, row_mask, norm_a, gnorm_a, thr, tie_a,
            p, s_p, gp, s_gp, norms_p, gnorms_p, gids + B, P,
            m_i, l_i, z_target, acc_a, max_a, d, dg, offset, inv_temp,
            True, WITH_GRAD, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
        )  # fmt: skip
        # AA: anchors x anchors.
        if CONTRAST_ANCHORS:
            m_i, l_i, z_target, max_a = _sweep_columns(
                a, s_a, ga, s_ga, rows, a_rows, row_mask, norm_a, gnorm_a, thr, tie_a,
                a, s_a, ga, s_ga, norms_a, gnorms_a, gids, B,
                m_i, l_i, z_target, acc_a, max_a, d, dg, offset, inv_temp,
                False, WITH_GRAD, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
            )  # fmt: skip
        # PP: own positives x positives; its row-side gradient goes to the positives.
        if CONTRAST_POSITIVES:
            norm_po = _load_norms(norms_p, p_rows, row_mask)
            gnorm_po = _load_norms(gnorms_p, p_rows, row_mask)
            tie_p = tl.load(ties + B + rows, mask=row_mask, other=0)
            m_i, l_i, z_target, max_p = _sweep_columns(
                p, s_p, gp, s_gp, rows, p_rows, row_mask, norm_po, gnorm_po, thr, tie_p,
                p, s_p, gp, s_gp, norms_p, gnorms_p, gids + B, P,
                m_i, l_i, z_target, acc_p, max_p, d, dg, offset, inv_temp,
                False, WITH_GRAD, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
            )  # fmt: skip
        # AN_m: anchors x negative column m.
        for m in range(num_neg):
            m64 = tl.cast(m, tl.int64)
            m_i, l_i, z_target, max_a = _sweep_columns(
                a, s_a, ga, s_ga, rows, a_rows, row_mask, norm_a, gnorm_a, thr, tie_a,
                n + m64 * s_nm, s_n, gn + m64 * s_gnm, s_gn,
                norms + B + P + m64 * P, gnorms + B + P + m64 * P, gids + B + P + m64 * P, P,
                m_i, l_i, z_target, acc_a, max_a, d, dg, offset, inv_temp,
                False, WITH_GRAD, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
            )  # fmt: skip

        # l_i holds every entry but the target; the target is never masked, so l > 0 and lse is
        # finite on valid rows (m_i is finite there: the target is one of the entries).
        m_safe = tl.where(m_i > float("-inf"), m_i, 0.0)
        l_safe = tl.where(row_mask, l_i + tl.exp(z_target - m_safe), 1.0)
        tl.store(lse_out + rows, m_i + tl.log(l_safe), mask=row_mask)
        tl.store(target_out + rows, z_target, mask=row_mask)

        if WITH_GRAD:
            # G_ij = (P_ij - [j target]) w_i / tau with P_ij = acc-weight * exp(acc_max - m) / l for
            # the other entries; the target's G is -(1 - P_target) w_i / tau = -(l_i / l) w_i / tau.
            w = tl.load(weight_ptr + rows, mask=row_mask, other=0.0) * inv_temp
            norm_po = _load_norms(norms_p, p_rows, row_mask)
            _store_gradient(
                acc_a, w * tl.exp(max_a - m_safe) / l_safe, a, s_a, a_rows, row_mask, norm_a,
                p, s_p, p_rows, w * (l_i / l_safe) / norm_po, grad_a, a_rows, d,
                True, False, BLOCK_M, BLOCK_K,
            )  # fmt: skip
            if CONTRAST_POSITIVES:
                _store_gradient(
                    acc_p, w * tl.exp(max_p - m_safe) / l_safe, p, s_p, p_rows, row_mask, norm_po,
                    p, s_p, p_rows, w, grad_p, p_rows, d,
                    False, False, BLOCK_M, BLOCK_K,
                )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Pass 2: column blocks
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sweep_rows(
    # the block's rows: student and guide inputs (row i of the block is x_rows_shift + i)
    x,
    s_x,
    gx,
    s_gx,
    norms_x,
    gnorms_x,
    x_shift,
    # columns of this program (fixed)
    y,
    s_y,
    gy,
    s_gy,
    cols,
    cols64,
    col_mask,
    norm_y,
    gnorm_y,
    col_ids,
    # per-row vectors of pass 1 (and the rows' tie codes)
    ties,
    thr_ptr,
    weight_ptr,
    lse_ptr,
    acc,
    B,
    d,
    dg,
    offset,
    inv_temp,
    IS_TARGET_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One block of pass 2: acc[c, :] += sum_i G_ic x_hat_i over every row tile."""
    ones = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    for r0 in range(0, B, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < B
        x_rows = rows.to(tl.int64) + x_shift
        norm_x = _load_norms(norms_x, x_rows, row_mask)
        gnorm_x = _load_norms(gnorms_x, x_rows, row_mask)
        thr = tl.load(thr_ptr + rows, mask=row_mask, other=0.0)
        row_tie = tl.load(ties + rows, mask=row_mask, other=0)
        z, is_target = _logit_tile(
            x, s_x, gx, s_gx, x_rows, norm_x, gnorm_x, y, s_y, gy, s_gy, cols64, norm_y, gnorm_y,
            rows, row_mask, cols, col_mask, thr, row_tie, col_ids, d, dg, offset, inv_temp,
            IS_TARGET_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
        )  # fmt: skip
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        w = tl.load(weight_ptr + rows, mask=row_mask, other=0.0) * inv_temp
        prob = tl.exp(z - lse[:, None])  # masked entries and invalid rows: exp(-inf) = 0
        # The target term P - 1 stays in fp32 (it cancels when P is close to 1).
        g = tl.where(is_target, prob - 1.0, prob) * w[:, None]
        _accumulate(
            acc,
            ones,
            tl.trans(g / norm_x[:, None]),
            x,
            s_x,
            x_rows,
            row_mask,
            d,
            BLOCK_N,
            BLOCK_K,
            UPCAST,
            PRECISION,
        )


@triton.jit
def column_pass_kernel(
    a,
    p,
    n,
    ga,
    gp,
    gn,
    norms,
    gnorms,
    gids,
    ties,
    thr_ptr,
    weight_ptr,
    lse_ptr,
    out,
    scratch,
    B,
    P,
    d,
    dg,
    offset,
    num_neg,
    inv_temp,
    s_a,
    s_p,
    s_nm,
    s_n,
    s_ga,
    s_gp,
    s_gnm,
    s_gn,
    SOURCE: tl.constexpr,
    CONTRAST_POSITIVES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Pass 2 for the columns of one input: SOURCE 0 = anchors (block AA), 1 = positives (AP and
    PP), 2 = negatives (AN_m for every m; `out` is (num_neg, P, d)). Adds the column-side
    gradient, taken through the normalisation, to `out` (contiguous, input dtype), which already
    holds the row-side part from pass 1 (or zeros). `scratch` is fp32 (programs, BLOCK_N, d)."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    acc = scratch + pid.to(tl.int64) * (BLOCK_N * d)
    n_cols = B if SOURCE == 0 else P
    tiles_per_input = tl.cdiv(n_cols, BLOCK_N)
    num_tiles = tiles_per_input * num_neg if SOURCE == 2 else tiles_per_input
    for tile in range(pid, num_tiles, num_programs):
        m64 = tl.cast(tile // tiles_per_input, tl.int64)  # negative column m (SOURCE 2)
        cols = (tile % tiles_per_input) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        cols64 = cols.to(tl.int64)
        _zero_scratch(acc, d, BLOCK_N, BLOCK_K)
        if SOURCE == 0:
            norm_y = _load_norms(norms, cols, col_mask)
            gnorm_y = _load_norms(gnorms, cols, col_mask)
            col_ids = tl.load(gids + cols, mask=col_mask, other=-1)
            # AA: rows are the anchors.
            _sweep_rows(
                a, s_a, ga, s_ga, norms, gnorms, 0,
                a, s_a, ga, s_ga, cols, cols64, col_mask, norm_y, gnorm_y, col_ids,
                ties, thr_ptr, weight_ptr, lse_ptr, acc, B, d, dg, offset, inv_temp,
                False, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
            )  # fmt: skip
            y, s_y, norms_y, out_rows = a, s_a, norms, cols64
        elif SOURCE == 1:
            norm_y = _load_norms(norms + B, cols, col_mask)
            gnorm_y = _load_norms(gnorms + B, cols, col_mask)
            col_ids = tl.load(gids + B + cols, mask=col_mask, other=-1)
            # AP: rows are the anchors, the target o + i included.
            _sweep_rows(
                a, s_a, ga, s_ga, norms, gnorms, 0,
                p, s_p, gp, s_gp, cols, cols64, col_mask, norm_y, gnorm_y, col_ids,
                ties, thr_ptr, weight_ptr, lse_ptr, acc, B, d, dg, offset, inv_temp,
                True, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
            )  # fmt: skip
            if CONTRAST_POSITIVES:
                # PP: rows are the own positives o + i.
                _sweep_rows(
                    p, s_p, gp, s_gp, norms + B, gnorms + B, offset,
                    p, s_p, gp, s_gp, cols, cols64, col_mask, norm_y, gnorm_y, col_ids,
                    ties + B, thr_ptr, weight_ptr, lse_ptr, acc, B, d, dg, offset, inv_temp,
                    False, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
                )  # fmt: skip
            y, s_y, norms_y, out_rows = p, s_p, norms + B, cols64
        else:
            norms_y = norms + B + P + m64 * P
            norm_y = _load_norms(norms_y, cols, col_mask)
            gnorm_y = _load_norms(gnorms + B + P + m64 * P, cols, col_mask)
            col_ids = tl.load(gids + B + P + m64 * P + cols, mask=col_mask, other=-1)
            y = n + m64 * s_nm
            # AN_m: rows are the anchors.
            _sweep_rows(
                a, s_a, ga, s_ga, norms, gnorms, 0,
                y, s_n, gn + m64 * s_gnm, s_gn, cols, cols64, col_mask, norm_y, gnorm_y, col_ids,
                ties, thr_ptr, weight_ptr, lse_ptr, acc, B, d, dg, offset, inv_temp,
                False, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
            )  # fmt: skip
            s_y, out_rows = s_n, m64 * P + cols64
        _store_gradient(
            acc, tl.full([BLOCK_N], 1.0, dtype=tl.float32), y, s_y, cols64, col_mask, norm_y,
            y, s_y, cols64, norm_y, out, out_rows, d,
            False, SOURCE != 2, BLOCK_N, BLOCK_K,
        )  # fmt: skip
