"""Triton JIT helpers both kernel families share (`fused_kernels`, `chunked_kernels`), and the row-dot kernel.

- `row_dots_kernel`: sum_k x_ik y_ik in fp32, for the norms and the thresholds (launched by `common`).
- `_dot_tile`: the fp32 dot of a row tile with a column tile over the features, BLOCK_K at a time.
- `_logit_tile`: the masked logits z of a tile (student and guide dots, the guide's mask, exact
  ties; notation in `fused_kernels`).
- `_load_norms`: max(|x|, eps) of some rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Must equal gist_fast.inputs.NORM_EPS.
NORM_EPS: tl.constexpr = tl.constexpr(1e-8)


@triton.jit
def row_dots_kernel(x, y, out, n_rows, dim, s_x, s_y, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[i] = sum_k x[i, k] * y[i, k], accumulated in fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    rows64 = rows.to(tl.int64)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (ks[None, :] < dim)
        xv = tl.load(x + rows64[:, None] * s_x + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        yv = tl.load(y + rows64[:, None] * s_y + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(xv * yv, axis=1)
    tl.store(out + rows, total, mask=row_mask)


# ----------------------------------------------------------------------------------------------
# Building blocks shared by both passes
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dot_tile(
    x,
    s_x,
    rows,
    row_mask,
    y,
    s_y,
    cols,
    col_mask,
    dim,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Raw dot products x[rows] . y[cols] (BLOCK_M x BLOCK_N, fp32), BLOCK_K features at a time.
    `rows` and `cols` are int64 row indices into x and y."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < dim
        xv = tl.load(x + rows[:, None] * s_x + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        # y is read transposed (BLOCK_K x BLOCK_N), as K is in the fused-attention tutorial.
        yv = tl.load(y + cols[None, :] * s_y + ks[:, None], mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong
            xv = xv.to(tl.float32)
            yv = yv.to(tl.float32)
        acc = tl.dot(xv, yv, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _logit_tile(
    # the tile's rows: student and guide inputs, int64 row indices into them, norms
    x,
    s_x,
    gx,
    s_gx,
    x_rows,
    norm_x,
    gnorm_x,
    # the tile's columns
    y,
    s_y,
    gy,
    s_gy,
    y_cols,
    norm_y,
    gnorm_y,
    # anchor rows i and block columns j of the tile, the thresholds of the rows
    rows,
    row_mask,
    cols,
    col_mask,
    thr,
    row_tie,
    col_ids,
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
    """z_ij = s_ij / tau of one tile, -inf where the guide masks and outside the tile; returns
    (z, is_target). `row_tie`: the rows' tie codes 2 * tie_id + decision; `col_ids`: the columns'
    guide-row ids. The guide tile is reduced to its keep mask before the student tile is computed,
    so the two fp32 accumulators are not live together."""
    guide_dots = _dot_tile(
        gx, s_gx, x_rows, row_mask, gy, s_gy, y_cols, col_mask, dg, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION
    )
    g = tl.math.div_rn(guide_dots, gnorm_x[:, None] * gnorm_y[None, :])
    # The target column o + i of row i (AP only; elsewhere nothing is a target).
    is_target = cols[None, :] == (rows + offset)[:, None] if IS_TARGET_BLOCK else cols[None, :] < 0
    # Strict rule g > thr, except exact ties (the threshold's own pair of guide rows), decided by
    # the row's exact decision; the target is never masked.
    tie = col_ids[None, :] == (row_tie >> 1)[:, None]
    masked = tl.where(tie, ((row_tie & 1) != 0)[:, None], g > thr[:, None])
    keep = ((masked == 0) | is_target) & row_mask[:, None] & col_mask[None, :]
    dots = _dot_tile(
        x, s_x, x_rows, row_mask, y, s_y, y_cols, col_mask, d, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION
    )
    s = dots * (1.0 / norm_x)[:, None] * (1.0 / norm_y)[None, :]
    z = tl.where(keep, s * inv_temp, float("-inf"))
    return z, is_target


@triton.jit
def _load_norms(norms, index, mask):
    """max(|x|, eps) of the rows `index` (fp32)."""
    return tl.maximum(tl.load(norms + index, mask=mask, other=1.0), NORM_EPS)
