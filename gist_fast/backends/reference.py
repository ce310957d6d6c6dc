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
from .common import reduce
from .ties import guide_mask, masked_at_tie, tie_ids


def normalize(x: Tensor) -> Tensor:
    """x / max(||x||_2, 1e-8), row by row."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def compute_dtype(inputs: GISTInputs) -> torch.dtype:
    """float64 if any input is float64, else float32 (half-precision inputs are upcast)."""
    wide = any(t.dtype == torch.float64 for t in (*inputs.student_tensors, *inputs.guide_tensors))
    return torch.float64 if wide else torch.float32


def gist_loss_reference(inputs: GISTInputs, options: GISTOptions) -> Tensor:
    """Materialised GIST loss, computed in float32 (float64 when any input is float64)."""
    B, o = inputs.batch_size, options.offset
    dtype = compute_dtype(inputs)
    a, p = normalize(inputs.anchor.to(dtype)), normalize(inputs.positive.to(dtype))
    negs = [normalize(n.to(dtype)) for n in inputs.negatives]
    with torch.no_grad():
        ga, gp = normalize(inputs.guide_anchor.to(dtype)), normalize(inputs.guide_positive.to(dtype))
        gnegs = [normalize(n.to(dtype)) for n in inputs.guide_negatives]

    rows = torch.arange(B, device=a.device)
    target = o + rows  # anchor i's positive is candidate o + i

    # The guide's similarity of each anchor to its own positive sets the anchor's threshold.
    guide_ap = ga @ gp.T
    t = guide_ap[rows, target]
    threshold = options.threshold(t)
    # Exact ties: the ids of the guide rows, and each row's decision at a tie.
    ids = tie_ids(inputs, options)
    tie_masked = masked_at_tie(t, options)

    # (student block, guide block, the rows' tie ids, the columns' ids) in the order the logits
    # are concatenated.
    id_a, id_p, *id_negs = ids.columns
    blocks = [(a @ p.T, guide_ap, ids.anchor_rows, id_p)]
    if options.contrast_anchors:
        blocks.append((a @ a.T, ga @ ga.T, ids.anchor_rows, id_a))
    if options.contrast_positives:
        own_p, own_gp = p[o : o + B], gp[o : o + B]
        blocks.append((own_p @ p.T, own_gp @ gp.T, ids.positive_rows, id_p))
    for n, gn, id_n in zip(negs, gnegs, id_negs, strict=True):
        blocks.append((a @ n.T, ga @ gn.T, ids.anchor_rows, id_n))

    masked_blocks = []
    for index, (student, guide, row_tie, col_ids) in enumerate(blocks):
        # strict: g > thr; a tie with the threshold pair is decided exactly (tie_masked)
        mask = guide_mask(guide, threshold, row_tie, col_ids, tie_masked)
        if index == 0:
            mask[rows, target] = False  # the positive itself is never masked
        masked_blocks.append(student.masked_fill(mask, float("-inf")))

    logits = torch.cat(masked_blocks, dim=1) / options.temperature
    losses = F.cross_entropy(logits, target, reduction="none")
    return reduce(losses, options.reduction)
