"""The reference backend: docs/loss.md written as plainly as possible.

Every block of logits is materialised (B x N floats in all), masked and fed to one cross-entropy;
autograd supplies the gradients.

The guide's mask: a candidate is masked when its guide similarity exceeds the row's threshold
(``thr_i = t_i - margin`` or ``t_i - |t_i| * margin``, ``t_i`` the guide's anchor-positive
similarity); the positive itself is never masked. Exact ties are decided exactly, not by
round-off: when the logit's pair of guide rows is bitwise the pair that defines ``t_i`` up to
order (anchor-row blocks AP, AA, AN: the candidate's guide row equals ``gp_{o+i}``; PP: it equals
``ga_i``), its similarity is ``t_i`` in exact arithmetic, so it is masked exactly when
``margin > 0`` (absolute) or ``|t_i| * margin > 0`` (relative). Every backend follows this rule
(`ties`). Half-precision inputs are upcast to float32 first. It is the
specification in code, the oracle of the tests (run in float64), and fine for small batches; use
``backend="torch"`` or ``"triton"`` for big ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..inputs import NORM_EPS, GISTInputs, GISTOptions
from .common import one_pass_matryoshka, reduce
from .ties import guide_mask, masked_at_tie, tie_ids


def normalize(x: Tensor) -> Tensor:
    """x / max(||x||_2, 1e-8), row by row."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def compute_dtype(inputs: GISTInputs) -> torch.dtype:
    """float64 if any input is float64, else float32 (half-precision inputs are upcast)."""
    wide = any(t.dtype == torch.float64 for t in (*inputs.student_tensors, *inputs.guide_tensors))
    return torch.float64 if wide else torch.float32


def guide_masks(inputs: GISTInputs, options: GISTOptions, dtype: torch.dtype) -> list[Tensor]:
    """The guide's mask of every block (True: the logit is dropped), in the order the logits are
    concatenated: AP, AA, PP, AN_1..AN_k. It depends on the guide alone, so Matryoshka dims share it."""
    B, o = inputs.batch_size, options.offset
    with torch.no_grad():
        ga, gp = normalize(inputs.guide_anchor.to(dtype)), normalize(inputs.guide_positive.to(dtype))
        gnegs = [normalize(n.to(dtype)) for n in inputs.guide_negatives]
        rows = torch.arange(B, device=ga.device)
        target = o + rows  # anchor i's positive is candidate o + i

        # The guide's similarity of each anchor to its own positive sets the anchor's threshold.
        guide_ap = ga @ gp.T
        t = guide_ap[rows, target]
        threshold = options.threshold(t)
        # Exact ties: the ids of the guide rows, and each row's decision at a tie.
        ids = tie_ids(inputs, options)
        tie_masked = masked_at_tie(t, options)

        # (guide block, the rows' tie ids, the columns' ids) in the order the logits are concatenated.
        id_a, id_p, *id_negs = ids.columns
        blocks = [(guide_ap, ids.anchor_rows, id_p)]
        if options.contrast_anchors:
            blocks.append((ga @ ga.T, ids.anchor_rows, id_a))
        if options.contrast_positives:
            blocks.append((gp[o : o + B] @ gp.T, ids.positive_rows, id_p))
        for gn, id_n in zip(gnegs, id_negs, strict=True):
            blocks.append((ga @ gn.T, ids.anchor_rows, id_n))

        masks = []
        for index, (guide, row_tie, col_ids) in enumerate(blocks):
            # strict: g > thr; a tie with the threshold pair is decided exactly (tie_masked)
            mask = guide_mask(guide, threshold, row_tie, col_ids, tie_masked)
            if index == 0:
                mask[rows, target] = False  # the positive itself is never masked
            masks.append(mask)
    return masks


def student_pairs(inputs: GISTInputs, options: GISTOptions, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    """(row vectors, column vectors) of every block's student similarities, un-normalised, in the
    order of `guide_masks`."""
    B, o = inputs.batch_size, options.offset
    a, p = inputs.anchor.to(dtype), inputs.positive.to(dtype)
    pairs = [(a, p)]
    if options.contrast_anchors:
        pairs.append((a, a))
    if options.contrast_positives:
        pairs.append((p[o : o + B], p))
    pairs += [(a, n.to(dtype)) for n in inputs.negatives]
    return pairs


def row_losses(cosines: list[Tensor], masks: list[Tensor], options: GISTOptions) -> Tensor:
    """(B,) cross-entropies of the masked, concatenated cosine blocks divided by the temperature."""
    B = cosines[0].shape[0]
    target = options.offset + torch.arange(B, device=cosines[0].device)
    masked = [c.masked_fill(mask, float("-inf")) for c, mask in zip(cosines, masks, strict=True)]
    logits = torch.cat(masked, dim=1) / options.temperature
    return F.cross_entropy(logits, target, reduction="none")


def matryoshka_row_losses(pairs: list[tuple[Tensor, Tensor]], masks: list[Tensor], options: GISTOptions) -> Tensor:
    """(B,) ``sum_k w_k * row losses of the first m_k student features``.

    One sweep over the features, dims ascending: a prefix's raw dot is a partial sum of the longer
    ones', so each block's dots grow segment by segment (``raw += x[:, m_prev:m] @ y[:, m_prev:m].T``);
    dim m's cosines divide them by the prefixes' own norms. The guide masks are shared."""
    order = sorted(zip(options.matryoshka_dims, options.matryoshka_weights, strict=True))
    raw: list[Tensor | float] = [0.0] * len(pairs)
    total, start = 0.0, 0
    for m, weight in order:
        cosines = []
        for index, (x, y) in enumerate(pairs):
            raw[index] = raw[index] + x[:, start:m] @ y[:, start:m].T
            norms = x[:, :m].norm(dim=1).clamp_min(NORM_EPS)[:, None] * y[:, :m].norm(dim=1).clamp_min(NORM_EPS)
            cosines.append(raw[index] / norms)
        start = m
        total = total + weight * row_losses(cosines, masks, options)
    return total


@one_pass_matryoshka
def gist_loss_reference(inputs: GISTInputs, options: GISTOptions) -> Tensor:
    """Materialised GIST loss, computed in float32 (float64 when any input is float64).

    With ``options.matryoshka_dims``: ``sum_k w_k L(student[..., :m_k])``, the guide masks
    computed once for all dims (`matryoshka_row_losses`)."""
    dtype = compute_dtype(inputs)
    masks = guide_masks(inputs, options, dtype)
    pairs = student_pairs(inputs, options, dtype)
    if options.matryoshka_dims is None:
        losses = row_losses([normalize(x) @ normalize(y).T for x, y in pairs], masks, options)
    else:
        losses = matryoshka_row_losses(pairs, masks, options)
    return reduce(losses, options.reduction)
