"""The tiled PyTorch backend: the two-pass plan (docs/loss.md, benchmarks/NOTES.md) in plain torch ops.

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

from ..inputs import NORM_EPS, GISTInputs, GISTOptions
from .common import one_pass_matryoshka, reduce, refuse_double_backward, row_weight
from .ties import TieIds, guide_mask, masked_at_tie, tie_ids

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
    """Hands out row tiles and column tiles of the normalised inputs, in the compute dtype.

    Student tiles come augmented with one extra column so that a single matmul yields shifted
    logits: rows ``[r̂_i / tau, -shift_i]`` times columns ``[ĉ_j, 1]`` give ``z_ij - shift_i``.
    `ties` are the guide rows' ids (exact ties, `ties.tie_ids`); computed here unless given.
    """

    def __init__(
        self, inputs: GISTInputs, options: GISTOptions, dtype: torch.dtype, ties: TieIds | None = None
    ) -> None:
        self.student = inputs.student_tensors
        self.guide = inputs.guide_tensors
        self.dtype = dtype
        self.batch = inputs.batch_size
        self.offset = options.offset
        self.inv_temperature = 1.0 / options.temperature
        # ||x|| and 1 / max(||x||, eps) of every row of every input: linear memory.
        self.norm = [t.detach().to(dtype).norm(dim=1) for t in self.student]
        self.inv_norm = [n.clamp_min(NORM_EPS).reciprocal() for n in self.norm]
        self.guide_inv_norm = [t.detach().to(dtype).norm(dim=1).clamp_min(NORM_EPS).reciprocal() for t in self.guide]
        self.ties = ties if ties is not None else tie_ids(inputs, options)

    def _slice(self, which: int, start: int, stop: int, guide: bool) -> Tensor:
        tensors, inv = (self.guide, self.guide_inv_norm) if guide else (self.student, self.inv_norm)
        return tensors[which][start:stop].detach().to(self.dtype) * inv[which][start:stop, None]

    def _augmented(self, which: int, start: int, stop: int, factor: float, last: Tensor | float) -> Tensor:
        """(stop - start) x (d + 1): the normalised student rows times `factor`, then `last`."""
        x = self.student[which][start:stop].detach().to(self.dtype)
        out = torch.empty(stop - start, x.shape[1] + 1, device=x.device, dtype=self.dtype)
        inv = self.inv_norm[which][start:stop, None]
        torch.mul(x, inv * factor if factor != 1.0 else inv, out=out[:, :-1])
        out[:, -1] = last
        return out

    def _row_start(self, which: int, start: int) -> int:
        return start + (self.offset if which == POSITIVE else 0)

    def rows(self, which: int, start: int, stop: int, guide: bool = False) -> Tensor:
        """Normalised row vectors of anchors `start:stop`; PP rows are positives o + start : o + stop."""
        return self._slice(which, self._row_start(which, start), self._row_start(which, stop), guide)

    def shifted_rows(self, which: int, start: int, stop: int, shift: Tensor) -> Tensor:
        """``[r̂_i / tau, -shift_i]`` for the rows of `rows(which, start, stop)`."""
        r0, r1 = self._row_start(which, start), self._row_start(which, stop)
        return self._augmented(which, r0, r1, self.inv_temperature, -shift)

    def cols(self, which: int, start: int, stop: int, guide: bool = False) -> Tensor:
        return self._slice(which, start, stop, guide)

    def augmented_cols(self, which: int, start: int, stop: int) -> Tensor:
        """``[ĉ_j, 1]``; its first d columns are the normalised column vectors."""
        return self._augmented(which, start, stop, 1.0, 1.0)

    def num_cols(self, which: int) -> int:
        return self.student[which].shape[0]

    def row_tie_ids(self, which: int, start: int, stop: int) -> Tensor:
        """The tie ids of anchor rows `start:stop` in a block whose rows come from `which`."""
        return self.ties.row_ids(pp=which == POSITIVE)[start:stop]

    def col_ids(self, which: int, start: int, stop: int) -> Tensor:
        return self.ties.columns[which][start:stop]


def _masked_logits(
    block: Block,
    options: GISTOptions,
    rows: tuple[Tensor, Tensor],
    cols: tuple[Tensor, Tensor],
    row_range: tuple[int, int],
    col_range: tuple[int, int],
    threshold: Tensor,
    ties: tuple[Tensor, Tensor, Tensor],
) -> Tensor:
    """``z_ij - shift_i`` on one tile, -inf where the guide similarity exceeds the row's threshold.

    `rows` = (shifted student rows ``[r̂/tau, -shift]``, normalised guide rows), `cols` = (augmented
    student columns ``[ĉ, 1]``, normalised guide columns): one matmul gives the shifted logits, so
    no elementwise pass divides by tau or subtracts the shift. `ties` = (the rows' tie ids, the
    columns' ids, the rows' decision at a tie): exact ties are decided by ids (`ties`).
    """
    (r0, r1), (c0, c1) = row_range, col_range
    z = rows[0] @ cols[0].T
    row_tie, col_ids, tie_masked = ties
    mask = guide_mask(rows[1] @ cols[1].T, threshold, row_tie, col_ids, tie_masked)  # strict: g > thr
    if block.is_target_block:
        # The target column o + i lies in this tile for rows i with c0 <= o + i < c1.
        i = torch.arange(r0, r1, device=z.device)
        j = options.offset + i
        inside = (j >= c0) & (j < c1)
        mask[(i - r0)[inside], (j - c0)[inside]] = False
    return z.masked_fill_(mask, float("-inf"))


def _thresholds(tiler: _Tiler, options: GISTOptions, tile_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """thr_i of every anchor, the student's target logit z_{i, o+i} and the exact decision at a tie
    (`ties.masked_at_tie`), a row tile at a time."""
    threshold = torch.empty(tiler.batch, device=tiler.student[0].device, dtype=tiler.dtype)
    target_logit = torch.empty_like(threshold)
    tie_masked = torch.empty(tiler.batch, device=threshold.device, dtype=torch.bool)
    for r0 in range(0, tiler.batch, tile_rows):
        r1 = min(r0 + tile_rows, tiler.batch)
        ga, gp = tiler.rows(ANCHOR, r0, r1, guide=True), tiler.rows(POSITIVE, r0, r1, guide=True)
        t = (ga * gp).sum(1)
        threshold[r0:r1] = options.threshold(t)
        tie_masked[r0:r1] = masked_at_tie(t, options)
        a, p = tiler.rows(ANCHOR, r0, r1), tiler.rows(POSITIVE, r0, r1)
        target_logit[r0:r1] = (a * p).sum(1) / options.temperature
    return threshold, target_logit, tie_masked


# Pass 1 keeps, per row, a shift m_i and sums relative to it (lse_i = m_i + log(row_sum_i)). The
# shift starts at the target logit, a real and never-masked entry, and moves only when a tile's
# exp() overflows or a row sum grows past this bound; a common tile then needs no max pass and no
# rescaling of the accumulators (far below float32's 3.4e38, so sums of bounded tiles stay finite).
RESCALE_ABOVE = 1e30


def _move_shift(
    delta: Tensor, shift: Tensor, row_sum: Tensor, accumulators: list[Tensor], shifted_rows: list[Tensor]
) -> None:
    """shift += delta, keeping the row sums and the accumulators relative to the new shift and the
    shift column of the student row tiles up to date."""
    shift.add_(delta)
    factor = torch.exp(-delta)
    row_sum.mul_(factor)
    for a in accumulators:
        a.mul_(factor[:, None])
    for rows in shifted_rows:
        rows[:, -1] = -shift


def _forward_pass(
    tiler: _Tiler,
    inputs: GISTInputs,
    options: GISTOptions,
    threshold: Tensor,
    target_logit: Tensor,
    tie_masked: Tensor,
    tile_rows: int,
    tile_cols: int,
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
        row_tie_masked = tie_masked[r0:r1]
        shift = target_logit[r0:r1].clone()
        row_sum = torch.zeros(r1 - r0, device=dev, dtype=dt)
        acc = {ANCHOR: mean_from_anchor[r0:r1], POSITIVE: None}
        if mean_from_positive is not None:
            acc[POSITIVE] = mean_from_positive[r0:r1]
        sides = {b.row_input for b in blocks}
        student_rows = {side: tiler.shifted_rows(side, r0, r1, shift) for side in sides}
        guide_rows = {side: tiler.rows(side, r0, r1, guide=True) for side in sides}

        running = (shift, row_sum, [a for a in acc.values() if a is not None], list(student_rows.values()))
        for block in blocks:
            for c0 in range(0, tiler.num_cols(block.col_input), tile_cols):
                c1 = min(c0 + tile_cols, tiler.num_cols(block.col_input))
                cols = (tiler.augmented_cols(block.col_input, c0, c1), tiler.cols(block.col_input, c0, c1, guide=True))
                rows = (student_rows[block.row_input], guide_rows[block.row_input])
                ties = (
                    tiler.row_tie_ids(block.row_input, r0, r1),
                    tiler.col_ids(block.col_input, c0, c1),
                    row_tie_masked,
                )
                z = _masked_logits(block, options, rows, cols, (r0, r1), (c0, c1), row_threshold, ties)
                weights = z.exp_()
                tile_sum = weights.sum(dim=1)
                if not bool((tile_sum <= RESCALE_ABOVE).all()):
                    # Rare: some z - shift overflowed exp(). Redo the tile with the shift moved up
                    # to the tile's row maxima (0 for rows whose entries so far are all masked).
                    z = _masked_logits(block, options, rows, cols, (r0, r1), (c0, c1), row_threshold, ties)
                    delta = z.amax(dim=1).clamp_min(0.0)
                    weights = z.sub_(delta[:, None]).exp_()
                    tile_sum = weights.sum(dim=1)
                    _move_shift(delta, *running)
                row_sum.add_(tile_sum)
                acc[block.row_input].addmm_(weights, cols[0][:, :-1])
                if not bool((row_sum <= RESCALE_ABOVE).all()):
                    _move_shift(row_sum.log().clamp_min(0.0), *running)
        # The target is never masked, so row_sum > 0 and lse is finite.
        lse[r0:r1] = shift + row_sum.log()
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
    tie_masked: Tensor,
    row_weight: Tensor,
    grads: list[Tensor],
    tile_rows: int,
    tile_cols: int,
) -> None:
    """Pass 2: add the column-side gradients dĉ_j += sum_i G_ij r̂_i into `grads` (w.r.t. the
    normalised inputs), with G_ij = (P_ij - [j target]) * row_weight_i / tau.

    P_ij = exp(z_ij - lse_i) comes from one matmul of ``[r̂_i/tau, -lse_i]`` with ``[ĉ_j, 1]``, and
    the row weights go into the (small) row tile rather than into the (large) P tile."""
    B = inputs.batch_size
    scale = row_weight / options.temperature
    for block in blocks_of(inputs, options):
        for c0 in range(0, tiler.num_cols(block.col_input), tile_cols):
            c1 = min(c0 + tile_cols, tiler.num_cols(block.col_input))
            col_grad = grads[block.col_input][c0:c1]
            cols = (tiler.augmented_cols(block.col_input, c0, c1), tiler.cols(block.col_input, c0, c1, guide=True))
            for r0 in range(0, B, tile_rows):
                r1 = min(r0 + tile_rows, B)
                rows = (
                    tiler.shifted_rows(block.row_input, r0, r1, lse[r0:r1]),
                    tiler.rows(block.row_input, r0, r1, guide=True),
                )
                ties = (
                    tiler.row_tie_ids(block.row_input, r0, r1),
                    tiler.col_ids(block.col_input, c0, c1),
                    tie_masked[r0:r1],
                )
                z = _masked_logits(block, options, rows, cols, (r0, r1), (c0, c1), threshold[r0:r1], ties)
                p = z.exp_()
                weighted_rows = tiler.rows(block.row_input, r0, r1).mul_(scale[r0:r1, None])
                col_grad.addmm_(p.T, weighted_rows)
    # The target term -1 of G at (i, o + i): column side of AP gets -scale_i * â_i.
    o = options.offset
    for r0 in range(0, B, tile_rows):
        r1 = min(r0 + tile_rows, B)
        grads[POSITIVE][o + r0 : o + r1].sub_(tiler.rows(ANCHOR, r0, r1).mul_(scale[r0:r1, None]))


def _row_side_gradients(
    tiler: _Tiler,
    inputs: GISTInputs,
    options: GISTOptions,
    mean_from_anchor: Tensor,
    mean_from_positive: Tensor | None,
    row_weight: Tensor,
    tile_rows: int,
) -> list[Tensor]:
    """Gradients w.r.t. the normalised student inputs, row side only:
    dâ_i = w_i/tau (E_a,i - p̂_{o+i}), dp̂_{o+i} = w_i/tau E_p,i, negatives 0.

    Overwrites and returns `mean_from_anchor` (and `mean_from_positive` when it covers every
    positive) as the anchor and positive gradients, so no further B x d buffers are needed."""
    B, o = inputs.batch_size, options.offset
    scale = (row_weight / options.temperature)[:, None]
    anchor_grad = mean_from_anchor
    for r0 in range(0, B, tile_rows):
        r1 = min(r0 + tile_rows, B)
        anchor_grad[r0:r1].sub_(tiler.rows(POSITIVE, r0, r1)).mul_(scale[r0:r1])
    positive = inputs.positive
    if mean_from_positive is not None and mean_from_positive.shape[0] == positive.shape[0]:
        positive_grad = mean_from_positive.mul_(scale)  # P = B, so o = 0
    else:
        positive_grad = torch.zeros(positive.shape, device=positive.device, dtype=tiler.dtype)
        if mean_from_positive is not None:
            positive_grad[o : o + B].addcmul_(mean_from_positive, scale)
    negative_grads = [torch.zeros(n.shape, device=n.device, dtype=tiler.dtype) for n in inputs.negatives]
    return [anchor_grad, positive_grad, *negative_grads]


def _through_normalisation(tiler: _Tiler, grads_hat: list[Tensor], tile_rows: int) -> list[Tensor]:
    """dx = (dx̂ - x̂ (x̂·dx̂)) / max(||x||, eps); below eps the norm is a constant and dx = dx̂ / eps.

    In place on `grads_hat`, a row tile at a time."""
    out = []
    for which, (x, g_hat) in enumerate(zip(tiler.student, grads_hat, strict=True)):
        for r0 in range(0, x.shape[0], tile_rows):
            r1 = min(r0 + tile_rows, x.shape[0])
            inv = tiler.inv_norm[which][r0:r1, None]
            g = g_hat[r0:r1]
            x_hat = x[r0:r1].detach().to(tiler.dtype) * inv
            radial = x_hat.mul_((x_hat * g).sum(1, keepdim=True))
            radial.masked_fill_((tiler.norm[which][r0:r1] < NORM_EPS)[:, None], 0.0)
            g.sub_(radial).mul_(inv)
        out.append(g_hat.to(x.dtype))
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
            threshold, target_logit, tie_masked = _thresholds(tiler, options, tile_rows)
            lse, e_a, e_p = _forward_pass(
                tiler, inputs, options, threshold, target_logit, tie_masked, tile_rows, tile_cols
            )
            # lse includes the target logit, so the exact loss is >= 0; round-off of a saturated
            # softmax can dip below (-3e-5 in fp32 at tau = 0.01): clamping only removes error.
            losses = (lse - target_logit).clamp_min_(0.0)
            B = inputs.batch_size
            loss = reduce(losses, options.reduction)

            ctx.options, ctx.k, ctx.tiles, ctx.dtypes = options, k, tiles, [t.dtype for t in tensors]
            needs = any(ctx.needs_input_grad[3 : 5 + k])
            if not needs:
                return loss
            if options.reduction == "none":
                # Per-row incoming weights are unknown until backward: keep what pass 2 needs.
                ctx.save_for_backward(
                    lse, threshold, tie_masked, e_a, e_p if e_p is not None else lse.new_empty(0), *tensors
                )
                ctx.ties = tiler.ties
                ctx.deferred = True
            else:
                weight = torch.full((B,), row_weight(options, B), device=lse.device, dtype=dtype)
                # e_a and e_p are not needed after this: their storage becomes the gradients.
                grads = _all_gradients(tiler, inputs, options, lse, threshold, tie_masked, e_a, e_p, weight, tiles)
                del e_a, e_p
                ctx.save_for_backward(*grads)
                ctx.deferred = False
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        refuse_double_backward()
        k = ctx.k
        n_student = 2 + k
        if not any(ctx.needs_input_grad[3 : 5 + k]):
            return (None,) * (3 + 2 * n_student)
        if ctx.deferred:
            lse, threshold, tie_masked, e_a, e_p, *tensors = ctx.saved_tensors
            inputs = GISTInputs(
                tensors[0],
                tensors[1],
                tuple(tensors[2 : 2 + k]),
                tensors[2 + k],
                tensors[3 + k],
                tuple(tensors[4 + k :]),
            )
            tiler = _Tiler(inputs, ctx.options, lse.dtype, ctx.ties)
            grads = _all_gradients(
                tiler,
                inputs,
                ctx.options,
                lse,
                threshold,
                tie_masked,
                e_a.clone(),  # saved tensors stay intact (retain_graph may call backward again)
                e_p.clone() if e_p.numel() else None,
                grad_out.to(lse.dtype),
                ctx.tiles,
            )
        else:
            grads = list(ctx.saved_tensors)
            # loss.backward() sends exactly 1: hand the saved gradients over (autograd then
            # releases them into .grad) instead of allocating scaled copies of all of them.
            if not bool((grad_out == 1).all()):
                grads = [g * grad_out.to(g.dtype) for g in grads]
        student = [g if ctx.needs_input_grad[3 + i] else None for i, g in enumerate(grads)]
        return (None, None, None, *student, *([None] * n_student))


def _all_gradients(tiler, inputs, options, lse, threshold, tie_masked, e_a, e_p, weight, tiles) -> list[Tensor]:
    """Row side plus column side, taken through the normalisation: one gradient per student input.

    Consumes e_a and e_p (their storage becomes the anchor and positive gradients)."""
    tile_rows, tile_cols = tiles
    grads_hat = _row_side_gradients(tiler, inputs, options, e_a, e_p, weight, tile_rows)
    _column_pass(tiler, inputs, options, lse, threshold, tie_masked, weight, grads_hat, tile_rows, tile_cols)
    return _through_normalisation(tiler, grads_hat, tile_rows)


@one_pass_matryoshka
def gist_loss_torch(
    inputs: GISTInputs, options: GISTOptions, *, tile_rows: int = TILE_ROWS, tile_cols: int = TILE_COLS
) -> Tensor:
    """Tiled GIST loss (any device torch supports); memory linear in B.

    `tile_rows` x `tile_cols` bounds the logit tile held at once. With ``options.matryoshka_dims``
    every prefix dim comes from one sweep (`torch_matryoshka`).
    """
    if tile_rows < 1 or tile_cols < 1:
        raise ValueError(f"tile sizes must be >= 1; got tile_rows={tile_rows}, tile_cols={tile_cols}")
    if options.matryoshka_dims is not None:
        from .torch_matryoshka import gist_loss_torch_matryoshka  # it builds on this module

        return gist_loss_torch_matryoshka(inputs, options, tile_rows=tile_rows, tile_cols=tile_cols)
    return _GISTTiledFunction.apply(
        options,
        len(inputs.negatives),
        (tile_rows, tile_cols),
        *inputs.student_tensors,
        *inputs.guide_tensors,
    )
