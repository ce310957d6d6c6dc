"""The tiled PyTorch backend: the two-pass plan of DESIGN.md sections 2-3, in plain torch ops.

Memory is linear in the batch: besides the inputs and their gradients it holds one
(tile_rows x tile_cols) tile of logits at a time and a few vectors of length B.

- Pass 1 walks row blocks. For every column tile of every block it forms the student cosine tile
  S and the guide tile Gd, masks S where Gd > thr, and updates an online logsumexp together with
  the softmax-weighted sums of the column vectors (the row-side gradients, as flash-attention
  accumulates its output). It yields lse_i, the loss and the row-side gradients.
- Pass 2 walks column tiles. For each it walks all rows, recomputes S, Gd and P = exp(z - lse),
  and accumulates the column-side gradient sum_i G_ij row_i. No scatter, no atomics.

For ``reduction="mean"``/``"sum"`` both passes run in the forward call and backward only scales
the saved gradients by the incoming scalar (as Liger's fused linear cross-entropy does). For
``"none"`` each row has its own incoming weight, so pass 2 runs in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..inputs import NORM_EPS, GISTInputs, GISTOptions

TILE_ROWS = 1024
TILE_COLS = 2048

# Which student input each block takes its rows and its columns from. Inputs are numbered
# 0 = anchor, 1 = positive, 2 + m = negative column m, for the student and the guide alike.
ANCHOR, POSITIVE = 0, 1


@dataclass(frozen=True)
class Block:
    """One block of logit columns: rows from input `row_input`, columns from `col_input`."""

    row_input: int
    col_input: int
    is_target_block: bool  # AP: column o + i of row i is the never-masked target


def blocks_of(inputs: GISTInputs, options: GISTOptions) -> list[Block]:
    """The blocks in the order their logits are concatenated: AP, AA, PP, AN_1..AN_k."""
    blocks = [Block(ANCHOR, POSITIVE, True)]
    if options.contrast_anchors:
        blocks.append(Block(ANCHOR, ANCHOR, False))
    if options.contrast_positives:
        blocks.append(Block(POSITIVE, POSITIVE, False))
    blocks += [Block(ANCHOR, 2 + m, False) for m in range(len(inputs.negatives))]
    return blocks


class _Tiler:
    """Hands out row tiles and column tiles of the normalised inputs, in the compute dtype."""

    def __init__(self, inputs: GISTInputs, options: GISTOptions, dtype: torch.dtype) -> None:
        self.student = inputs.student_tensors
        self.guide = inputs.guide_tensors
        self.dtype = dtype
        self.batch = inputs.batch_size
        self.offset = options.offset
        # 1 / max(||x||, eps) of every row of every input: linear memory.
        self.inv_norm = [self._inv_norm(t) for t in self.student]
        self.guide_inv_norm = [self._inv_norm(t) for t in self.guide]

    def _inv_norm(self, t: Tensor) -> Tensor:
        return t.detach().to(self.dtype).norm(dim=1).clamp_min(NORM_EPS).reciprocal()

    def _slice(self, which: int, start: int, stop: int, guide: bool) -> Tensor:
        tensors, inv = (self.guide, self.guide_inv_norm) if guide else (self.student, self.inv_norm)
        return tensors[which][start:stop].detach().to(self.dtype) * inv[which][start:stop, None]

    def rows(self, which: int, start: int, stop: int, guide: bool = False) -> Tensor:
        """Normalised row vectors of anchors `start:stop`; PP rows are positives o + start : o + stop."""
        shift = self.offset if which == POSITIVE else 0
        return self._slice(which, start + shift, stop + shift, guide)

    def cols(self, which: int, start: int, stop: int, guide: bool = False) -> Tensor:
        return self._slice(which, start, stop, guide)

    def num_cols(self, which: int) -> int:
        return self.student[which].shape[0]


def _masked_logits(
    tiler: _Tiler,
    block: Block,
    options: GISTOptions,
    rows: tuple[Tensor, Tensor],
    row_range: tuple[int, int],
    col_range: tuple[int, int],
    threshold: Tensor,
) -> Tensor:
    """z = S / tau on one tile, -inf where the guide similarity exceeds the row's threshold."""
    (r0, r1), (c0, c1) = row_range, col_range
    student_rows, guide_rows = rows
    s = student_rows @ tiler.cols(block.col_input, c0, c1).T
    g = guide_rows @ tiler.cols(block.col_input, c0, c1, guide=True).T
    mask = g > threshold[:, None]  # strict: ties are kept
    if block.is_target_block:
        # The target column o + i lies in this tile for rows i with c0 <= o + i < c1.
        i = torch.arange(r0, r1, device=s.device)
        j = options.offset + i
        inside = (j >= c0) & (j < c1)
        mask[(i - r0)[inside], (j - c0)[inside]] = False
    return (s / options.temperature).masked_fill_(mask, float("-inf"))


def _thresholds(tiler: _Tiler, options: GISTOptions, tile_rows: int) -> tuple[Tensor, Tensor]:
    """thr_i of every anchor and the student's target logit z_{i, o+i}, a row tile at a time."""
    threshold = torch.empty(tiler.batch, device=tiler.student[0].device, dtype=tiler.dtype)
    target_logit = torch.empty_like(threshold)
    for r0 in range(0, tiler.batch, tile_rows):
        r1 = min(r0 + tile_rows, tiler.batch)
        ga, gp = tiler.rows(ANCHOR, r0, r1, guide=True), tiler.rows(POSITIVE, r0, r1, guide=True)
        threshold[r0:r1] = options.threshold((ga * gp).sum(1))
        a, p = tiler.rows(ANCHOR, r0, r1), tiler.rows(POSITIVE, r0, r1)
        target_logit[r0:r1] = (a * p).sum(1) / options.temperature
    return threshold, target_logit


def _forward_pass(
    tiler: _Tiler, inputs: GISTInputs, options: GISTOptions, threshold: Tensor, tile_rows: int, tile_cols: int
):
    """Pass 1. Returns lse (B,) and the softmax-weighted means of the column vectors seen from
    the anchor rows (E_a, B x d) and from the PP rows (E_p, B x d, or None without PP)."""
    B, dev, dt = inputs.batch_size, inputs.anchor.device, tiler.dtype
    d = inputs.anchor.shape[1]
    blocks = blocks_of(inputs, options)
    lse = torch.empty(B, device=dev, dtype=dt)
    mean_from_anchor = torch.zeros(B, d, device=dev, dtype=dt)
    mean_from_positive = torch.zeros(B, d, device=dev, dtype=dt) if options.contrast_positives else None

    for r0 in range(0, B, tile_rows):
        r1 = min(r0 + tile_rows, B)
        row_threshold = threshold[r0:r1]
        row_max = torch.full((r1 - r0,), float("-inf"), device=dev, dtype=dt)
        row_sum = torch.zeros(r1 - r0, device=dev, dtype=dt)
        acc = {ANCHOR: mean_from_anchor[r0:r1], POSITIVE: None}
        if mean_from_positive is not None:
            acc[POSITIVE] = mean_from_positive[r0:r1]
        row_vectors = {
            side: (tiler.rows(side, r0, r1), tiler.rows(side, r0, r1, guide=True))
            for side in {b.row_input for b in blocks}
        }
        for block in blocks:
            for c0 in range(0, tiler.num_cols(block.col_input), tile_cols):
                c1 = min(c0 + tile_cols, tiler.num_cols(block.col_input))
                z = _masked_logits(
                    tiler, block, options, row_vectors[block.row_input], (r0, r1), (c0, c1), row_threshold
                )
                # Online logsumexp; a row whose entries so far are all masked keeps max -inf, and
                # `safe` keeps exp() away from (-inf) - (-inf).
                new_max = torch.maximum(row_max, z.amax(dim=1))
                safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
                rescale = torch.exp(row_max - safe)
                weights = torch.exp(z - safe[:, None])
                row_sum = row_sum * rescale + weights.sum(dim=1)
                for a in acc.values():
                    if a is not None:
                        a.mul_(rescale[:, None])
                acc[block.row_input].addmm_(weights, tiler.cols(block.col_input, c0, c1))
                row_max = new_max
        # The target is never masked, so row_sum > 0 and lse is finite.
        lse[r0:r1] = row_max + row_sum.log()
        for a in acc.values():
            if a is not None:
                a.div_(row_sum[:, None])
    return lse, mean_from_anchor, mean_from_positive


def _column_pass(
    tiler: _Tiler,
    inputs: GISTInputs,
    options: GISTOptions,
    lse: Tensor,
    threshold: Tensor,
    row_weight: Tensor,
    grads: list[Tensor],
    tile_rows: int,
    tile_cols: int,
) -> None:
    """Pass 2: add the column-side gradients dĉ_j += sum_i G_ij r̂_i into `grads` (w.r.t. the
    normalised inputs), with G_ij = (P_ij - [j target]) * row_weight_i / tau."""
    B = inputs.batch_size
    scale = row_weight / options.temperature
    for block in blocks_of(inputs, options):
        for c0 in range(0, tiler.num_cols(block.col_input), tile_cols):
            c1 = min(c0 + tile_cols, tiler.num_cols(block.col_input))
            col_grad = grads[block.col_input][c0:c1]
            for r0 in range(0, B, tile_rows):
                r1 = min(r0 + tile_rows, B)
                rows = (tiler.rows(block.row_input, r0, r1), tiler.rows(block.row_input, r0, r1, guide=True))
                z = _masked_logits(tiler, block, options, rows, (r0, r1), (c0, c1), threshold[r0:r1])
                g = torch.exp(z - lse[r0:r1, None]).mul_(scale[r0:r1, None])
                col_grad.addmm_(g.T, rows[0])
    # The target term -1 of G at (i, o + i): column side of AP gets -scale_i * â_i.
    o = options.offset
    grads[POSITIVE][o : o + B] -= scale[:, None] * tiler.rows(ANCHOR, 0, B)


def _row_side(
    tiler: _Tiler,
    options: GISTOptions,
    mean_from_anchor: Tensor,
    mean_from_positive: Tensor | None,
    row_weight: Tensor,
    grads: list[Tensor],
) -> None:
    """Add the row-side gradients: dâ_i += w_i/tau (E_a,i - p̂_{o+i}), dp̂_{o+i} += w_i/tau E_p,i."""
    B, o = mean_from_anchor.shape[0], options.offset
    scale = (row_weight / options.temperature)[:, None]
    grads[ANCHOR] += scale * (mean_from_anchor - tiler.rows(POSITIVE, 0, B))
    if mean_from_positive is not None:
        grads[POSITIVE][o : o + B] += scale * mean_from_positive


def _through_normalisation(tiler: _Tiler, grads_hat: list[Tensor]) -> list[Tensor]:
    """dx = (dx̂ - x̂ (x̂·dx̂)) / max(||x||, eps); below eps the norm is a constant and dx = dx̂ / eps."""
    out = []
    for which, (x, g_hat) in enumerate(zip(tiler.student, grads_hat, strict=True)):
        inv = tiler.inv_norm[which][:, None]
        x_hat = x.detach().to(tiler.dtype) * inv
        clamped = (x.detach().to(tiler.dtype).norm(dim=1) < NORM_EPS)[:, None]
        projected = g_hat - x_hat * (x_hat * g_hat).sum(1, keepdim=True)
        out.append(torch.where(clamped, g_hat, projected).mul_(inv).to(x.dtype))
    return out


def _compute_dtype(inputs: GISTInputs) -> torch.dtype:
    wide = any(t.dtype == torch.float64 for t in (*inputs.student_tensors, *inputs.guide_tensors))
    return torch.float64 if wide else torch.float32


class _GISTTiledFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, options: GISTOptions, num_negatives: int, tiles: tuple[int, int], *tensors: Tensor):
        k = num_negatives
        inputs = GISTInputs(
            tensors[0], tensors[1], tensors[2 : 2 + k], tensors[2 + k], tensors[3 + k], tensors[4 + k :]
        )
        dtype = _compute_dtype(inputs)
        tiler = _Tiler(inputs, options, dtype)
        tile_rows, tile_cols = tiles
        with torch.no_grad():
            threshold, target_logit = _thresholds(tiler, options, tile_rows)
            lse, e_a, e_p = _forward_pass(tiler, inputs, options, threshold, tile_rows, tile_cols)
            losses = lse - target_logit
            B = inputs.batch_size
            if options.reduction == "none":
                loss = losses
            else:
                loss = losses.sum() / B if options.reduction == "mean" else losses.sum()

            ctx.options, ctx.k, ctx.tiles, ctx.dtypes = options, k, tiles, [t.dtype for t in tensors]
            needs = any(ctx.needs_input_grad[3 : 5 + k])
            if not needs:
                return loss
            if options.reduction == "none":
                # Per-row incoming weights are unknown until backward: keep what pass 2 needs.
                ctx.save_for_backward(lse, threshold, e_a, e_p if e_p is not None else lse.new_empty(0), *tensors)
                ctx.deferred = True
            else:
                weight = torch.full(
                    (B,), 1.0 / B if options.reduction == "mean" else 1.0, device=lse.device, dtype=dtype
                )
                grads = _all_gradients(tiler, inputs, options, lse, threshold, e_a, e_p, weight, tiles)
                ctx.save_for_backward(*grads)
                ctx.deferred = False
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        k = ctx.k
        n_student = 2 + k
        if not any(ctx.needs_input_grad[3 : 5 + k]):
            return (None,) * (3 + 2 * n_student)
        if ctx.deferred:
            lse, threshold, e_a, e_p, *tensors = ctx.saved_tensors
            inputs = GISTInputs(
                tensors[0],
                tensors[1],
                tuple(tensors[2 : 2 + k]),
                tensors[2 + k],
                tensors[3 + k],
                tuple(tensors[4 + k :]),
            )
            tiler = _Tiler(inputs, ctx.options, lse.dtype)
            grads = _all_gradients(
                tiler,
                inputs,
                ctx.options,
                lse,
                threshold,
                e_a,
                e_p if e_p.numel() else None,
                grad_out.to(lse.dtype),
                ctx.tiles,
            )
        else:
            grads = [g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
        student = [g if ctx.needs_input_grad[3 + i] else None for i, g in enumerate(grads)]
        return (None, None, None, *student, *([None] * n_student))


def _all_gradients(tiler, inputs, options, lse, threshold, e_a, e_p, weight, tiles) -> list[Tensor]:
    """Row side plus column side, taken through the normalisation: one gradient per student input."""
    grads_hat = [torch.zeros(t.shape, device=t.device, dtype=tiler.dtype) for t in inputs.student_tensors]
    _row_side(tiler, options, e_a, e_p, weight, grads_hat)
    _column_pass(tiler, inputs, options, lse, threshold, weight, grads_hat, *tiles)
    return _through_normalisation(tiler, grads_hat)


def gist_loss_torch(
    inputs: GISTInputs, options: GISTOptions, *, tile_rows: int = TILE_ROWS, tile_cols: int = TILE_COLS
) -> Tensor:
    """Tiled GIST loss (any device torch supports); memory linear in B.

    `tile_rows` x `tile_cols` bounds the logit tile held at once.
    """
    if tile_rows < 1 or tile_cols < 1:
        raise ValueError(f"tile sizes must be >= 1; got tile_rows={tile_rows}, tile_cols={tile_cols}")
    return _GISTTiledFunction.apply(
        options,
        len(inputs.negatives),
        (tile_rows, tile_cols),
        *inputs.student_tensors,
        *inputs.guide_tensors,
    )
