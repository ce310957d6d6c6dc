"""The tiled torch backend's Matryoshka path: every prefix dim of the student in one two-pass sweep.

``sum_k w_k L_k``, L_k the GIST loss of the student embeddings cut to their first m_k features
(cosine after truncation) against the full guide. The plan is torch_tiled.py's (pass 1 over row
tiles: online logsumexp and row-side gradient sums; pass 2 over column tiles: column-side sums),
with what the dims share computed once per tile:

- the guide mask (the guide tile, the threshold and the exact-tie rule), shared by every dim;
- the raw student dots of every prefix from one sweep over the features up to the largest dim:
  with the dims ascending, ``raw = rows[:, :m_1] @ cols[:, :m_1].T`` and then
  ``raw += rows[:, m_{k-1}:m_k] @ cols[:, m_{k-1}:m_k].T``, a prefix's dot being a partial sum of
  the next one's; dim k's logits are ``raw * (1/|r[:m_k]|) * (1/|c[:m_k]|) / tau``.

Each dim keeps its own norms, shift and logsumexp, target logit and gradient products. Memory is
linear in B: per dim the row-side sums (B x m_k, twice with PP) and column-side gradients (P x m_k
per student input), on top of one tile of raw dots, one of logits and the mask.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..inputs import NORM_EPS, GISTInputs, GISTOptions
from .common import reduce, refuse_double_backward, row_weight
from .ties import guide_mask
from .torch_tiled import ANCHOR, POSITIVE, RESCALE_ABOVE, Block, _compute_dtype, _move_shift, _thresholds, _Tiler
from .torch_tiled import blocks_of as _blocks_of


class _Prefixes:
    """The dims ascending, their weights, and per student input the inverse prefix norms."""

    def __init__(self, tiler: _Tiler, options: GISTOptions) -> None:
        pairs = sorted(zip(options.matryoshka_dims, options.matryoshka_weights, strict=True))
        self.dims = [m for m, _ in pairs]
        self.weights = [w for _, w in pairs]
        self.starts = [0, *self.dims[:-1]]  # segment k covers features starts[k]:dims[k]
        self.norm, self.inv_norm = [], []  # per input: (K, rows)
        for x in tiler.student:
            x = x.detach().to(tiler.dtype)
            segments = torch.stack([x[:, a:b].square().sum(1) for a, b in zip(self.starts, self.dims, strict=True)])
            norm = segments.cumsum(0).sqrt()
            self.norm.append(norm)
            self.inv_norm.append(norm.clamp_min(NORM_EPS).reciprocal())

    def __len__(self) -> int:
        return len(self.dims)


def _raw(tiler: _Tiler, which: int, start: int, stop: int, width: int) -> Tensor:
    """Un-normalised student rows start:stop of input `which`, first `width` features."""
    return tiler.student[which][start:stop, :width].detach().to(tiler.dtype)


def _row_bounds(tiler: _Tiler, which: int, r0: int, r1: int) -> tuple[int, int]:
    """Rows of input `which` that play anchor rows r0:r1 (PP rows are positives o + r0 : o + r1)."""
    return tiler._row_start(which, r0), tiler._row_start(which, r1)


def _tile_mask(tiler, block: Block, options, row_range, col_range, threshold, tie_masked) -> Tensor:
    """The guide's mask of one tile (True = dropped), the target entries of AP never dropped."""
    (r0, r1), (c0, c1) = row_range, col_range
    g = tiler.rows(block.row_input, r0, r1, guide=True) @ tiler.cols(block.col_input, c0, c1, guide=True).T
    mask = guide_mask(
        g,
        threshold[r0:r1],
        tiler.row_tie_ids(block.row_input, r0, r1),
        tiler.col_ids(block.col_input, c0, c1),
        tie_masked[r0:r1],
    )
    if block.is_target_block:
        i = torch.arange(r0, r1, device=mask.device)
        j = options.offset + i
        inside = (j >= c0) & (j < c1)
        mask[(i - r0)[inside], (j - c0)[inside]] = False
    return mask


def _sweep(rows: Tensor, cols: Tensor, prefixes: _Prefixes, mask: Tensor):
    """Yield (k, raw dots of the first dims[k] features) for k = 0..K-1, the dots of a tile summed
    segment by segment into one buffer (valid until the next step), -inf where `mask` drops the
    entry: set once, it stays -inf through the later segments' sums and every dim's positive
    scaling, so the mask is applied once for all dims."""
    raw = None
    for k, (a, b) in enumerate(zip(prefixes.starts, prefixes.dims, strict=True)):
        if raw is None:
            raw = (rows[:, a:b] @ cols[:, a:b].T).masked_fill_(mask, float("-inf"))
        else:
            raw.addmm_(rows[:, a:b], cols[:, a:b].T)
        yield k, raw


def _logits(raw: Tensor, row_scale: Tensor, col_scale: Tensor, shift: Tensor, out: Tensor) -> Tensor:
    """``raw_ij * row_scale_i * col_scale_j - shift_i`` into `out` (scales > 0: -inf stays -inf)."""
    torch.mul(raw, col_scale[None, :], out=out)
    return torch.addcmul(shift[:, None].neg(), out, row_scale[:, None], out=out)  # two passes over the tile


def _target_logits(tiler: _Tiler, prefixes: _Prefixes, options: GISTOptions, tile_rows: int) -> Tensor:
    """(K, B): each dim's student target logit z_{i, o+i}."""
    B, o = tiler.batch, options.offset
    out = torch.empty(len(prefixes), B, device=tiler.student[0].device, dtype=tiler.dtype)
    top = prefixes.dims[-1]
    for r0 in range(0, B, tile_rows):
        r1 = min(r0 + tile_rows, B)
        products = _raw(tiler, ANCHOR, r0, r1, top) * _raw(tiler, POSITIVE, o + r0, o + r1, top)
        segments = torch.stack([products[:, a:b].sum(1) for a, b in zip(prefixes.starts, prefixes.dims, strict=True)])
        inv = prefixes.inv_norm[ANCHOR][:, r0:r1] * prefixes.inv_norm[POSITIVE][:, o + r0 : o + r1]
        out[:, r0:r1] = segments.cumsum(0) * inv / options.temperature
    return out


def _forward_pass(tiler, inputs, options, prefixes, threshold, tie_masked, target_logit, tile_rows, tile_cols):
    """Pass 1: per dim, lse (B,) and the softmax-weighted means of the normalised column vectors
    seen from the anchor rows (B x m_k) and from the PP rows (B x m_k, or None without PP)."""
    B, dev, dt = inputs.batch_size, inputs.anchor.device, tiler.dtype
    K, top, inv_tau = len(prefixes), prefixes.dims[-1], 1.0 / options.temperature
    blocks = _blocks_of(inputs, options)
    lse = torch.empty(K, B, device=dev, dtype=dt)
    mean_a = [torch.zeros(B, m, device=dev, dtype=dt) for m in prefixes.dims]
    mean_p = [torch.zeros(B, m, device=dev, dtype=dt) for m in prefixes.dims] if options.contrast_positives else None
    for r0 in range(0, B, tile_rows):
        r1 = min(r0 + tile_rows, B)
        shift = target_logit[:, r0:r1].clone()
        row_sum = torch.zeros(K, r1 - r0, device=dev, dtype=dt)
        sides = {b.row_input for b in blocks}
        rows = {s: _raw(tiler, s, *_row_bounds(tiler, s, r0, r1), top) for s in sides}
        row_scale = {s: prefixes.inv_norm[s][:, slice(*_row_bounds(tiler, s, r0, r1))] * inv_tau for s in sides}
        acc = [{ANCHOR: mean_a[k][r0:r1], POSITIVE: mean_p[k][r0:r1] if mean_p else None} for k in range(K)]
        for block in blocks:
            n_cols = tiler.num_cols(block.col_input)
            for c0 in range(0, n_cols, tile_cols):
                c1 = min(c0 + tile_cols, n_cols)
                mask = _tile_mask(tiler, block, options, (r0, r1), (c0, c1), threshold, tie_masked)
                cols = _raw(tiler, block.col_input, c0, c1, top)
                col_inv = prefixes.inv_norm[block.col_input][:, c0:c1]
                z = torch.empty(r1 - r0, c1 - c0, device=dev, dtype=dt)
                for k, raw in _sweep(rows[block.row_input], cols, prefixes, mask):
                    scale = row_scale[block.row_input][k]
                    weights = _logits(raw, scale, col_inv[k], shift[k], z).exp_()
                    tile_sum = weights.sum(dim=1)
                    running = (shift[k], row_sum[k], [a for a in acc[k].values() if a is not None], [])
                    if not bool((tile_sum <= RESCALE_ABOVE).all()):
                        # Rare: exp() overflowed; redo the tile with the shift at the row maxima.
                        z = _logits(raw, scale, col_inv[k], shift[k], z)
                        delta = z.amax(dim=1).clamp_min(0.0)
                        weights = z.sub_(delta[:, None]).exp_()
                        tile_sum = weights.sum(dim=1)
                        _move_shift(delta, *running)
                    row_sum[k].add_(tile_sum)
                    m = prefixes.dims[k]
                    acc[k][block.row_input].addmm_(weights, cols[:, :m] * col_inv[k][:, None])
                    if not bool((row_sum[k] <= RESCALE_ABOVE).all()):
                        _move_shift(row_sum[k].log().clamp_min(0.0), *running)
        # The target is never masked, so every row sum is > 0 and lse finite.
        lse[:, r0:r1] = shift + row_sum.log()
        for k in range(K):
            for a in acc[k].values():
                if a is not None:
                    a.div_(row_sum[k][:, None])
    return lse, mean_a, mean_p


def _column_pass(tiler, inputs, options, prefixes, lse, threshold, tie_masked, weight, grads, tile_rows, tile_cols):
    """Pass 2: add dim k's column-side gradients ``sum_i G^k_ij r̂^k_i`` into grads[k] (w.r.t. the
    normalised prefixes), G^k_ij = (P^k_ij - [j target]) w_k weight_i / tau."""
    B, dev, dt = inputs.batch_size, inputs.anchor.device, tiler.dtype
    top, inv_tau = prefixes.dims[-1], 1.0 / options.temperature
    scale = [w * weight * inv_tau for w in prefixes.weights]  # (B,) per dim
    for block in _blocks_of(inputs, options):
        n_cols = tiler.num_cols(block.col_input)
        for c0 in range(0, n_cols, tile_cols):
            c1 = min(c0 + tile_cols, n_cols)
            cols = _raw(tiler, block.col_input, c0, c1, top)
            col_inv = prefixes.inv_norm[block.col_input][:, c0:c1]
            z = None
            for r0 in range(0, B, tile_rows):
                r1 = min(r0 + tile_rows, B)
                mask = _tile_mask(tiler, block, options, (r0, r1), (c0, c1), threshold, tie_masked)
                bounds = _row_bounds(tiler, block.row_input, r0, r1)
                rows = _raw(tiler, block.row_input, *bounds, top)
                row_inv = prefixes.inv_norm[block.row_input][:, slice(*bounds)]
                if z is None or z.shape[0] != r1 - r0:
                    z = torch.empty(r1 - r0, c1 - c0, device=dev, dtype=dt)
                for k, raw in _sweep(rows, cols, prefixes, mask):
                    p = _logits(raw, row_inv[k] * inv_tau, col_inv[k], lse[k, r0:r1], z).exp_()
                    m = prefixes.dims[k]
                    weighted_rows = rows[:, :m] * (row_inv[k] * scale[k][r0:r1])[:, None]
                    grads[k][block.col_input][c0:c1].addmm_(p.T, weighted_rows)
    # The target term -1 of G at (i, o + i): the column side of AP gets -scale_i â_i.
    o = options.offset
    for r0 in range(0, B, tile_rows):
        r1 = min(r0 + tile_rows, B)
        anchors = _raw(tiler, ANCHOR, r0, r1, top)
        for k, m in enumerate(prefixes.dims):
            coefficient = (prefixes.inv_norm[ANCHOR][k, r0:r1] * scale[k][r0:r1])[:, None]
            grads[k][POSITIVE][o + r0 : o + r1].sub_(anchors[:, :m] * coefficient)


def _row_side_gradients(tiler, inputs, options, prefixes, mean_a, mean_p, weight, tile_rows):
    """Per dim, gradients w.r.t. the normalised prefixes, row side only:
    dâ^k_i = s^k_i (E^k_a,i - p̂^k_{o+i}), dp̂^k_{o+i} = s^k_i E^k_p,i, negatives 0, with
    s^k = w_k weight / tau. Consumes mean_a (and mean_p when it covers every positive)."""
    B, o = inputs.batch_size, options.offset
    grads = []
    for k, m in enumerate(prefixes.dims):
        scale = (prefixes.weights[k] * weight / options.temperature)[:, None]
        anchor_grad = mean_a[k]
        for r0 in range(0, B, tile_rows):
            r1 = min(r0 + tile_rows, B)
            inv = prefixes.inv_norm[POSITIVE][k, o + r0 : o + r1, None]
            positive_hat = _raw(tiler, POSITIVE, o + r0, o + r1, m) * inv
            anchor_grad[r0:r1].sub_(positive_hat).mul_(scale[r0:r1])
        positive = inputs.positive
        if mean_p is not None and positive.shape[0] == B:
            positive_grad = mean_p[k].mul_(scale)  # P = B, so o = 0
        else:
            positive_grad = torch.zeros(positive.shape[0], m, device=positive.device, dtype=tiler.dtype)
            if mean_p is not None:
                positive_grad[o : o + B].addcmul_(mean_p[k], scale)
        negatives = [torch.zeros(n.shape[0], m, device=n.device, dtype=tiler.dtype) for n in inputs.negatives]
        grads.append([anchor_grad, positive_grad, *negatives])
    return grads


def _through_normalisation(tiler, prefixes, grads_hat, tile_rows) -> list[Tensor]:
    """``dx[:, :m_k] += (dx̂^k - x̂^k (x̂^k·dx̂^k)) / max(|x[:m_k]|, eps)`` summed over the dims; a
    prefix whose norm is below eps has a constant norm there, so its gradient is dx̂^k / eps."""
    out = []
    for which, x in enumerate(tiler.student):
        grad = torch.zeros(x.shape, device=x.device, dtype=tiler.dtype)
        for k, m in enumerate(prefixes.dims):
            g_hat = grads_hat[k][which]
            for r0 in range(0, x.shape[0], tile_rows):
                r1 = min(r0 + tile_rows, x.shape[0])
                inv = prefixes.inv_norm[which][k, r0:r1, None]
                g = g_hat[r0:r1]
                x_hat = _raw(tiler, which, r0, r1, m) * inv  # a view of the input in its own dtype: no in-place
                radial = x_hat.mul_((x_hat * g).sum(1, keepdim=True))
                radial.masked_fill_((prefixes.norm[which][k, r0:r1] < NORM_EPS)[:, None], 0.0)
                grad[r0:r1, :m].add_(g.sub_(radial).mul_(inv))
        out.append(grad.to(x.dtype))
    return out


def _all_gradients(tiler, inputs, options, prefixes, lse, threshold, tie_masked, mean_a, mean_p, weight, tiles):
    tile_rows, tile_cols = tiles
    grads_hat = _row_side_gradients(tiler, inputs, options, prefixes, mean_a, mean_p, weight, tile_rows)
    _column_pass(tiler, inputs, options, prefixes, lse, threshold, tie_masked, weight, grads_hat, tile_rows, tile_cols)
    return _through_normalisation(tiler, prefixes, grads_hat, tile_rows)


def _inputs_of(tensors, k: int) -> GISTInputs:
    return GISTInputs(tensors[0], tensors[1], tuple(tensors[2 : 2 + k]), tensors[2 + k], tensors[3 + k],
                      tuple(tensors[4 + k :]))  # fmt: skip


class _MatryoshkaTiledFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, options: GISTOptions, num_negatives: int, tiles: tuple[int, int], *tensors: Tensor):
        k = num_negatives
        inputs = _inputs_of(tensors, k)
        dtype = _compute_dtype(inputs)
        tiler = _Tiler(inputs, options, dtype)
        prefixes = _Prefixes(tiler, options)
        tile_rows, tile_cols = tiles
        with torch.no_grad():
            threshold, _, tie_masked = _thresholds(tiler, options, tile_rows)
            target_logit = _target_logits(tiler, prefixes, options, tile_rows)
            lse, mean_a, mean_p = _forward_pass(
                tiler, inputs, options, prefixes, threshold, tie_masked, target_logit, tile_rows, tile_cols
            )
            # Each dim's loss is >= 0 exactly (lse includes the target); clamping removes round-off.
            per_dim = (lse - target_logit).clamp_min_(0.0)
            weights = torch.tensor(prefixes.weights, device=lse.device, dtype=dtype)
            loss = reduce((per_dim * weights[:, None]).sum(0), options.reduction)
            ctx.options, ctx.k, ctx.tiles = options, k, tiles
            if not any(ctx.needs_input_grad[3 : 5 + k]):
                return loss
            B = inputs.batch_size
            if options.reduction == "none":
                # Per-row incoming weights are unknown until backward: keep what pass 2 needs.
                ctx.save_for_backward(lse, threshold, tie_masked, *tensors)
                ctx.saved = (tiler.ties, prefixes, mean_a, mean_p)
                ctx.deferred = True
            else:
                weight = torch.full((B,), row_weight(options, B), device=lse.device, dtype=dtype)
                grads = _all_gradients(
                    tiler, inputs, options, prefixes, lse, threshold, tie_masked, mean_a, mean_p, weight, tiles
                )
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
            lse, threshold, tie_masked, *tensors = ctx.saved_tensors
            ties, prefixes, mean_a, mean_p = ctx.saved
            inputs = _inputs_of(tensors, k)
            tiler = _Tiler(inputs, ctx.options, lse.dtype, ties)
            grads = _all_gradients(
                tiler,
                inputs,
                ctx.options,
                prefixes,
                lse,
                threshold,
                tie_masked,
                [a.clone() for a in mean_a],  # kept intact for a second backward (retain_graph)
                [p.clone() for p in mean_p] if mean_p is not None else None,
                grad_out.to(lse.dtype),
                ctx.tiles,
            )
        else:
            grads = list(ctx.saved_tensors)
            if not bool((grad_out == 1).all()):
                grads = [g * grad_out.to(g.dtype) for g in grads]
        student = [g if ctx.needs_input_grad[3 + i] else None for i, g in enumerate(grads)]
        return (None, None, None, *student, *([None] * n_student))


def gist_loss_torch_matryoshka(inputs: GISTInputs, options: GISTOptions, *, tile_rows: int, tile_cols: int) -> Tensor:
    """``sum_k w_k L(student[..., :m_k])`` for ``options.matryoshka_dims``, in one tiled two-pass
    sweep (see the module docstring); memory linear in B."""
    return _MatryoshkaTiledFunction.apply(
        options, len(inputs.negatives), (tile_rows, tile_cols), *inputs.student_tensors, *inputs.guide_tensors
    )
