"""The reference backend: DESIGN.md section 1 written as plainly as possible.

Every block of logits is materialised (B x N floats in all), masked and fed to one cross-entropy;
autograd supplies the gradients. Half-precision inputs are upcast to float32 first. It is the
specification in code, the oracle of the tests (run in float64), and fine for small batches; use
``backend="torch"`` or ``"triton"`` for big ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..inputs import NORM_EPS, GISTInputs, GISTOptions
from .common import reduce


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
    threshold = options.threshold(guide_ap[rows, target]).unsqueeze(1)

    # (student block, guide block) in the order the logits are concatenated.
    blocks = [(a @ p.T, guide_ap)]
    if options.contrast_anchors:
        blocks.append((a @ a.T, ga @ ga.T))
    if options.contrast_positives:
        own_p, own_gp = p[o : o + B], gp[o : o + B]
        blocks.append((own_p @ p.T, own_gp @ gp.T))
    for n, gn in zip(negs, gnegs, strict=True):
        blocks.append((a @ n.T, ga @ gn.T))

    masked_blocks = []
    for index, (student, guide) in enumerate(blocks):
        mask = guide > threshold  # strict: a tie with the threshold is kept
        if index == 0:
            mask[rows, target] = False  # the positive itself is never masked
        masked_blocks.append(student.masked_fill(mask, float("-inf")))

    logits = torch.cat(masked_blocks, dim=1) / options.temperature
    losses = F.cross_entropy(logits, target, reduction="none")
    return reduce(losses, options.reduction)
