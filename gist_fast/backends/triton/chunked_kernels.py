"""Triton kernels of the chunked GIST loss (benchmarks/NOTES.md, v3): GEMM-shaped, no scratch.

The fused kernels (`fused_kernels`) keep each program's row-side gradient (rows x d in fp32) in an
L2 scratch, which caps them near 33 FLOP/byte. Here the work is cut into chunks of R anchor rows x
C columns of one block, and each chunk runs two kernels whose tiles have a GEMM's traffic (and,
in pass 1, a small one between them):

- `tile_kernel`: the masked logits z of a BLOCK_M x BLOCK_N tile (student and guide dots, the
  guide's mask: `shared_kernels._logit_tile`, shared with the fused kernels), then
  - pass 1 (MODE 0): e = exp(z) / 2^q_t with q_t the row's max in this tile rounded up to a whole
    power of two (so e <= 1), q_t and the row's sum of e in fp32, W = e / |y_j| / 2^k_t (at most 1,
    k_t recorded), and the target logit z_{i,o+i} (block AP; the target's own entry is left out of
    W and the sum);
  - pass 2 (MODE 1): H = (exp(z - lse_i) - [j target]) w_i / (tau |x_i|) / 2^kappa_i in [-1, 1].
  W and H are the only values rounded to 16 bits: every other factor is an exact power of two.
- `scaled_gemm_kernel`: out = alpha * out + (A * row_scale * k_scale) @ B into an fp32 accumulator,
  where A is a W or H chunk and B rows of an input: the online-softmax rescale (alpha, and
  row_scale = 2^(q_t + k_t - Q) per row and tile) and the 2^kappa factors (k_scale) are powers of
  two applied to the A tile before it goes to the tensor cores, so they round nothing.
- `chunk_stats_kernel` (pass 1, between the two): the online-softmax step over the chunk's tile
  maxima and sums (running max, sum, row_scale and alpha for the GEMM), one small launch.

The orchestration over chunks and the normalisation Jacobian are in `chunked` (Matryoshka: `chunked_matryoshka`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .shared_kernels import _dot_tile, _load_norms, _logit_tile

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _pow2_exact(e):
    """2^e for integer-valued float32 e, bit-exact: 0 below 2^-126 (and for -inf), capped at 2^127.

    Built from the exponent bits rather than exp2, whose GPU instruction is an approximation: the
    online-softmax rescales must be exact powers of two so that scaling a 16-bit tile rounds nothing."""
    normal = e >= -126.0
    exponent = tl.where(normal, tl.minimum(e, 127.0), 0.0).to(tl.int32)
    return tl.where(normal, ((exponent + 127) << 23).to(tl.float32, bitcast=True), 0.0)


@triton.jit
def tile_kernel(
    # the row input (student, guide; row i of the block is row x_shift + i) and its norms
    x,
    s_x,
    gx,
    s_gx,
    norms_x,
    gnorms_x,
    x_shift,
    # the column input (column j of the block is row j), its norms and its guide rows' ids
    y,
    s_y,
    gy,
    s_gy,
    norms_y,
    gnorms_y,
    gids_y,
    # per anchor row: tie code (2 * tie id + decision), threshold, lse (MODE 1); the target
    # logits out (MODE 0, AP)
    ties,
    thr_ptr,
    lse_ptr,
    target_out,
    # the chunk: anchor rows row0 + [0, n_rows), block columns col0 + [0, n_cols)
    row0,
    n_rows,
    col0,
    n_cols,
    # outputs: W or H (n_rows x n_cols, row stride s_w); per (row, tile) max and sum (MODE 0)
    w_out,
    s_w,
    tile_max,
    tile_sum,
    tile_exp,
    s_t,
    row_coef,
    d,
    dg,
    offset,
    inv_temp,
    MODE: tl.constexpr,
    IS_TARGET_BLOCK: tl.constexpr,
    WRITE_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One tile of a chunk; grid (cdiv(n_rows, BLOCK_M), cdiv(n_cols, BLOCK_N))."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    local_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = local_rows < n_rows
    col_mask = local_cols < n_cols
    rows = row0 + local_rows  # anchor i
    cols = col0 + local_cols  # block column j
    x_rows = rows.to(tl.int64) + x_shift
    y_cols = cols.to(tl.int64)
    norm_x = _load_norms(norms_x, x_rows, row_mask)
    gnorm_x = _load_norms(gnorms_x, x_rows, row_mask)
    norm_y = _load_norms(norms_y, y_cols, col_mask)
    gnorm_y = _load_norms(gnorms_y, y_cols, col_mask)
    thr = tl.load(thr_ptr + rows, mask=row_mask, other=0.0)
    row_tie = tl.load(ties + rows, mask=row_mask, other=0)
    col_ids = tl.load(gids_y + y_cols, mask=col_mask, other=-1)
    z, is_target = _logit_tile(
        x, s_x, gx, s_gx, x_rows, norm_x, gnorm_x, y, s_y, gy, s_gy, y_cols, norm_y, gnorm_y,
        rows, row_mask, cols, col_mask, thr, row_tie, col_ids, d, dg, offset, inv_temp,
        IS_TARGET_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
    )  # fmt: skip
    tile_mask = row_mask[:, None] & col_mask[None, :]
    w_ptr = w_out + local_rows.to(tl.int64)[:, None] * s_w + local_cols[None, :]
    if MODE == 0:
        # The target's share is left out of W and the sum (its logit is recorded below, and joined
        # to the sum at the end), so the row gradient's target term (1 - P_target) p_hat is formed
        # without cancellation.
        z_other = tl.where(is_target, float("-inf"), z) if IS_TARGET_BLOCK else z
        # Shift by q = ceil(m_t log2 e), the row's max in this tile in whole powers of two, so the
        # rescales between tiles and chunks are exact powers of two. A row with every entry of
        # this tile masked has m_t = -inf, e = 0 and q recorded as -inf.
        m_t = tl.max(z_other, axis=1)
        q = tl.where(m_t > float("-inf"), tl.ceil(m_t * LOG2E), 0.0)
        e = tl.exp2(z_other * LOG2E - q[:, None])  # exp(z) / 2^q, in (1/2, 1] at the row's max
        t_ptr = local_rows.to(tl.int64) * s_t + pid_n
        tl.store(tile_max + t_ptr, tl.where(m_t > float("-inf"), q, float("-inf")), mask=row_mask)
        tl.store(tile_sum + t_ptr, tl.sum(e, axis=1), mask=row_mask)
        if WRITE_W:
            # W = e / |y_j| / 2^k with k = ceil(log2 of the row's largest e / |y_j|): at most 1 (no
            # fp16 overflow) and rounded to 16 bits once; the GEMM multiplies 2^k back exactly.
            v = e / norm_y[None, :]
            v_max = tl.max(v, axis=1)
            # (k >= -120 keeps 2^-k finite for absurdly large norms. A row of zeros takes log2(1);
            # not a clamp like max(v, 1e-38): triton 3.6 types that literal as float64, NOTES v3a.)
            v_pos = tl.where(v_max > 0, v_max, 1.0)
            k = tl.where(v_max > 0, tl.maximum(tl.ceil(tl.log2(v_pos)), -120.0), 0.0)
            tl.store(tile_exp + t_ptr, k, mask=row_mask)
            tl.store(w_ptr, (v * _pow2_exact(-k)[:, None]).to(w_out.dtype.element_ty), mask=tile_mask)
        if IS_TARGET_BLOCK:
            # Each row's target column o + i lies in exactly one tile of AP; that tile records z.
            has_target = tl.max(is_target.to(tl.int32), axis=1) > 0
            z_target = tl.sum(tl.where(is_target, z, 0.0), axis=1)
            tl.store(target_out + rows, z_target, mask=row_mask & has_target)
    else:
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        prob = tl.exp(z - lse[:, None])  # masked entries and invalid rows: exp(-inf) = 0
        # The target term P - 1 is formed in fp32 (it cancels when P is close to 1). row_coef is
        # w_i / (tau |x_i|) / 2^kappa_i (in [-1, 1]; the GEMM multiplies 2^kappa_i back exactly).
        h = tl.where(is_target, prob - 1.0, prob)
        coef = tl.load(row_coef + local_rows, mask=row_mask, other=0.0)
        tl.store(w_ptr, (h * coef[:, None]).to(w_out.dtype.element_ty), mask=tile_mask)


@triton.jit
def scaled_gemm_kernel(
    out,
    s_out,
    a,
    s_a,
    b,
    s_b,
    b_row0,
    alpha,
    row_scale,
    s_rs,
    k_scale,
    peak,
    M,
    N,
    K,
    A_TRANSPOSED: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    HAS_K_SCALE: tl.constexpr,
    BELOW_PEAK: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[m, n] = alpha[m] out[m, n] + sum_k A[m, k] row_scale[m, k // TILE] k_scale[k] b[b_row0 + k, n]
    (each factor only when its HAS_ flag is set).

    out: fp32 (M x N), row stride s_out. A: M x K, A[m, k] = a[m * s_a + k], or a[k * s_a + m] when
    A_TRANSPOSED (a chunk read transposed). b: rows of an input with contiguous features. TILE must
    be a multiple of BLOCK_K, so a K step lies in one tile of row_scale (M x cdiv(K, TILE), row
    stride s_rs). The scaled A tile is rounded to b's dtype for the tensor cores; the sum is fp32."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    rm64 = rm.to(tl.int64)
    # BELOW_PEAK (fp16): the scales are divided by `peak`, a power of two at least their largest
    # product, so no scaled entry can overflow fp16; the sum is multiplied back at the end.
    inv_peak = 1.0 / tl.load(peak) if BELOW_PEAK else 1.0
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        ab_mask = m_mask[:, None] & k_mask[None, :]
        if A_TRANSPOSED:
            av = tl.load(a + rk.to(tl.int64)[None, :] * s_a + rm[:, None], mask=ab_mask, other=0.0)
        else:
            av = tl.load(a + rm64[:, None] * s_a + rk[None, :], mask=ab_mask, other=0.0)
        b_rows = b_row0 + rk.to(tl.int64)
        bv = tl.load(b + b_rows[:, None] * s_b + rn[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        # The scales are powers of two, so the scaled A tile in b's dtype is exact (barring
        # underflow); under the interpreter, whose 16-bit dot is wrong, the dot runs
        # in fp32 on the same values.
        av = av.to(tl.float32)
        if HAS_K_SCALE:
            av = av * tl.load(k_scale + rk, mask=k_mask, other=0.0)[None, :]
        if HAS_ROW_SCALE:
            av = av * tl.load(row_scale + rm64 * s_rs + k0 // TILE, mask=m_mask, other=0.0)[:, None]
        if BELOW_PEAK:
            av = av * inv_peak
        av = av.to(b.dtype.element_ty)
        if UPCAST:
            av = av.to(tl.float32)
            bv = bv.to(tl.float32)
        acc = tl.dot(av, bv, acc, input_precision=PRECISION)
    if BELOW_PEAK:
        acc = acc * tl.load(peak)
    o_ptr = out + rm64[:, None] * s_out + rn[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    previous = tl.load(o_ptr, mask=o_mask, other=0.0)
    if HAS_ALPHA:
        previous = previous * tl.load(alpha + rm, mask=m_mask, other=0.0)[:, None]
    tl.store(o_ptr, previous + acc, mask=o_mask)


@triton.jit
def chunk_stats_kernel(
    # the tile kernel's pass-1 outputs for this chunk: [nr, tiles], row stride s_t
    tile_max,
    tile_sum,
    tile_exp,
    s_t,
    # per row, updated in place: running max (log2 units, integer-valued), sum, accumulator reference
    big,
    total,
    ref,
    # outputs for the GEMM (WITH_GRAD): row_scale [nr, tiles] (row stride s_t), alpha [nr]
    row_scale,
    alpha,
    nr,
    tiles,
    WITH_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Pass 1's online-softmax step after one chunk, for BLOCK_R rows (one launch instead of ~20
    small torch ops per chunk, NOTES.md v3c). With Q the new running max and q_t the tile maxima:
        Q     = max(Q_old, max_t q_t)                       (shift s = Q, or 0 while Q = -inf)
        total = total * 2^(Q_old - s) + sum_t tile_sum_t * 2^(q_t - s)
        row_scale_t = 2^(q_t - s + k_t),  alpha = 2^(ref - s),  ref = Q
    Every factor is an exact power of two (`_pow2_exact`)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    t = tl.arange(0, BLOCK_T)
    row_mask = rows < nr
    mask = row_mask[:, None] & (t[None, :] < tiles)
    offs = rows.to(tl.int64)[:, None] * s_t + t[None, :]
    t_max = tl.load(tile_max + offs, mask=mask, other=float("-inf"))
    t_sum = tl.load(tile_sum + offs, mask=mask, other=0.0)
    old = tl.load(big + rows, mask=row_mask, other=float("-inf"))
    new = tl.maximum(old, tl.max(t_max, axis=1))
    shift = tl.where(new > float("-inf"), new, 0.0)
    tot = tl.load(total + rows, mask=row_mask, other=0.0)
    tot = tot * _pow2_exact(old - shift) + tl.sum(t_sum * _pow2_exact(t_max - shift[:, None]), axis=1)
    tl.store(total + rows, tot, mask=row_mask)
    tl.store(big + rows, new, mask=row_mask)
    if WITH_GRAD:
        t_exp = tl.load(tile_exp + offs, mask=mask, other=0.0)
        tl.store(row_scale + offs, _pow2_exact(t_max - shift[:, None] + t_exp), mask=mask)
        previous_ref = tl.load(ref + rows, mask=row_mask, other=float("-inf"))
        tl.store(alpha + rows, _pow2_exact(previous_ref - shift), mask=row_mask)
        tl.store(ref + rows, new, mask=row_mask)  # stays -inf while the row has no entry (acc still 0)


@triton.jit
def matryoshka_tile_kernel(
    # the row input (student, guide; row i of the block is row x_shift + i); its prefix norms
    # (NUM_DIMS rows of stride s_pn, one per dim) and guide norms
    x,
    s_x,
    gx,
    s_gx,
    pnorms_x,
    gnorms_x,
    x_shift,
    # the column input (column j of the block is row j), its prefix norms, guide norms, guide ids
    y,
    s_y,
    gy,
    s_gy,
    pnorms_y,
    gnorms_y,
    gids_y,
    s_pn,
    # (NUM_DIMS + 1,) int32: 0 and the dims ascending; dim k's segment is bounds[k]:bounds[k + 1]
    bounds,
    # per anchor row: tie code, threshold; per dim (row stride s_kb): lse (MODE 1), target logits
    # out (MODE 0, AP)
    ties,
    thr_ptr,
    lse_ptr,
    target_out,
    s_kb,
    # the chunk: anchor rows row0 + [0, n_rows), block columns col0 + [0, n_cols)
    row0,
    n_rows,
    col0,
    n_cols,
    # outputs per dim k: W or H at w_out + k s_wk (n_rows x n_cols, row stride s_w); tile stats
    # at + k s_tk (MODE 0); MODE 1's row coefficients per dim at row_coef + k s_coef
    w_out,
    s_w,
    s_wk,
    tile_max,
    tile_sum,
    tile_exp,
    s_t,
    s_tk,
    row_coef,
    s_coef,
    # MODE 1: per segment the rows' powers of two 2^-kappa (stride s_coef), an fp32 scratch laid out as w_out, and the
    # per-(dim, row tile, column) projection sums out (strides s_ck, s_cm)
    k_scale,
    scratch,
    col_dot,
    s_ck,
    s_cm,
    d,
    dg,
    offset,
    inv_temp,
    NUM_DIMS: tl.constexpr,
    MODE: tl.constexpr,
    IS_TARGET_BLOCK: tl.constexpr,
    WRITE_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """`tile_kernel` for every Matryoshka prefix dim of one tile at once (benchmarks/NOTES.md,
    Matryoshka): the guide's keep mask once, then one sweep over the student features in ascending
    segments; after segment k the running dots are dim k's raw prefix dots, scaled by dim k's
    prefix norms into its logits.

    MODE 0: dim k's W and tile statistics, exactly as `tile_kernel` writes them for one dim.
    MODE 1: the H of each feature segment s, summed over the dims k >= s that cover it:
        H_s = |y^s_j| 2^-kappa_si sum_{k >= s} t^k_ij,  t^k_ij = (P^k - [target]) f_ki / |y^k_j|,
    with f_ki = w_k weight_i / (tau |x^k_i|) (`row_coef`, per dim), 2^kappa_si at least every
    |f_ki| with k >= s (`k_scale` holds 2^-kappa_si, per segment) and |y^s_j| / |y^k_j| <= 1 for
    k >= s (prefix norms grow with the dim): |H_s| <= K, each dim's share kept from underflow. The
    GEMM of segment s multiplies 2^kappa_si back, the caller 1 / |y^s_j|. The t^k are kept in fp32
    in `scratch` and summed after the sweep, largest dim first (H_s rounded to 16 bits once). Also
    per dim and column the tile's share of y_hat^k . v^k, sum_i t^k_ij dots^k_ij (`col_dot`)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    local_rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = local_rows < n_rows
    col_mask = local_cols < n_cols
    rows = row0 + local_rows  # anchor i
    cols = col0 + local_cols  # block column j
    x_rows = rows.to(tl.int64) + x_shift
    y_cols = cols.to(tl.int64)
    gnorm_x = _load_norms(gnorms_x, x_rows, row_mask)
    gnorm_y = _load_norms(gnorms_y, y_cols, col_mask)
    thr = tl.load(thr_ptr + rows, mask=row_mask, other=0.0)
    row_tie = tl.load(ties + rows, mask=row_mask, other=0)
    col_ids = tl.load(gids_y + y_cols, mask=col_mask, other=-1)
    # The guide's keep mask, shared by every dim (as in `_logit_tile`).
    guide_dots = _dot_tile(
        gx, s_gx, x_rows, row_mask, gy, s_gy, y_cols, col_mask, dg, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION
    )
    g = tl.math.div_rn(guide_dots, gnorm_x[:, None] * gnorm_y[None, :])
    is_target = cols[None, :] == (rows + offset)[:, None] if IS_TARGET_BLOCK else cols[None, :] < 0
    tie = col_ids[None, :] == (row_tie >> 1)[:, None]
    masked = tl.where(tie, ((row_tie & 1) != 0)[:, None], g > thr[:, None])
    keep = ((masked == 0) | is_target) & row_mask[:, None] & col_mask[None, :]
    tile_mask = row_mask[:, None] & col_mask[None, :]
    local64 = local_rows.to(tl.int64)
    dots = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(NUM_DIMS):
        # Segment k of the one sweep: features bounds[k]:bounds[k + 1], added to the running dots.
        # The K blocks are aligned to BLOCK_K and loaded whole (masked at d only, which the JIT
        # knows is a multiple of 16: vector loads, pipelined), and the row tile's features outside
        # the segment zeroed in registers; a block split by a dim is loaded by both its segments.
        start = tl.load(bounds + k)
        stop = tl.load(bounds + k + 1)
        for k0 in range((start // BLOCK_K) * BLOCK_K, stop, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < d
            xv = tl.load(x + x_rows[:, None] * s_x + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            yv = tl.load(y + y_cols[None, :] * s_y + ks[:, None], mask=col_mask[None, :] & k_mask[:, None], other=0.0)
            xv = tl.where(((ks >= start) & (ks < stop))[None, :], xv, tl.zeros_like(xv))
            if UPCAST:  # the interpreter's bf16 dot is wrong
                xv = xv.to(tl.float32)
                yv = yv.to(tl.float32)
            dots = tl.dot(xv, yv, dots, input_precision=PRECISION)
        # (Per-dim offsets k * stride stay in int32: the launcher keeps the K chunk matrices under 2^31.)
        k64 = k
        norm_x = _load_norms(pnorms_x + k64 * s_pn, x_rows, row_mask)
        norm_y = _load_norms(pnorms_y + k64 * s_pn, y_cols, col_mask)
        s = dots * (1.0 / norm_x)[:, None] * (1.0 / norm_y)[None, :]
        z = tl.where(keep, s * inv_temp, float("-inf"))
        w_ptr = w_out + k64 * s_wk + local64[:, None] * s_w + local_cols[None, :]
        if MODE == 0:
            # As `tile_kernel`: the target left out of W and the sum, rows shifted by whole powers of two.
            z_other = tl.where(is_target, float("-inf"), z) if IS_TARGET_BLOCK else z
            m_t = tl.max(z_other, axis=1)
            q = tl.where(m_t > float("-inf"), tl.ceil(m_t * LOG2E), 0.0)
            e = tl.exp2(z_other * LOG2E - q[:, None])
            t_ptr = k64 * s_tk + local64 * s_t + pid_n
            tl.store(tile_max + t_ptr, tl.where(m_t > float("-inf"), q, float("-inf")), mask=row_mask)
            tl.store(tile_sum + t_ptr, tl.sum(e, axis=1), mask=row_mask)
            if WRITE_W:
                v = e / norm_y[None, :]
                v_max = tl.max(v, axis=1)
                v_pos = tl.where(v_max > 0, v_max, 1.0)
                exp_k = tl.where(v_max > 0, tl.maximum(tl.ceil(tl.log2(v_pos)), -120.0), 0.0)
                tl.store(tile_exp + t_ptr, exp_k, mask=row_mask)
                tl.store(w_ptr, (v * _pow2_exact(-exp_k)[:, None]).to(w_out.dtype.element_ty), mask=tile_mask)
            if IS_TARGET_BLOCK:
                has_target = tl.max(is_target.to(tl.int32), axis=1) > 0
                z_target = tl.sum(tl.where(is_target, z, 0.0), axis=1)
                tl.store(target_out + k64 * s_kb + rows, z_target, mask=row_mask & has_target)
        else:
            lse = tl.load(lse_ptr + k64 * s_kb + rows, mask=row_mask, other=0.0)
            prob = tl.exp(z - lse[:, None])
            h = tl.where(is_target, prob - 1.0, prob)
            coef = tl.load(row_coef + k64 * s_coef + local_rows, mask=row_mask, other=0.0)
            term = h * coef[:, None] / norm_y[None, :]
            tl.store(scratch + k64 * s_wk + local64[:, None] * s_w + local_cols[None, :], term, mask=tile_mask)
            projection = tl.sum(term * dots, axis=0)
            tl.store(col_dot + k64 * s_ck + pid_m * s_cm + local_cols, projection, mask=col_mask)
    if MODE == 1:
        # Suffix sums over the dims, largest first: segment s's H covers dims s..K-1. The scratch
        # was written by other threads of this program: a CTA barrier before reading it back.
        tl.debug_barrier()
        suffix = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for step in range(NUM_DIMS):
            seg = NUM_DIMS - 1 - step
            offs = seg * s_wk + local64[:, None] * s_w + local_cols[None, :]
            suffix += tl.load(scratch + offs, mask=tile_mask, other=0.0)
            norm_seg = _load_norms(pnorms_y + seg * s_pn, y_cols, col_mask)
            inv_scale = tl.load(k_scale + seg * s_coef + local_rows, mask=row_mask, other=0.0)
            h_seg = suffix * norm_seg[None, :] * inv_scale[:, None]
            tl.store(w_out + offs, h_seg.to(w_out.dtype.element_ty), mask=tile_mask)
