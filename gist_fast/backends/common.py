"""Pieces every backend's autograd glue shares: the reduction and the double-backward guard."""

from __future__ import annotations

import torch
from torch import Tensor

from ..inputs import GISTOptions

DOUBLE_BACKWARD_ERROR = (
    "gist_fast: the GIST loss does not support double backward (create_graph=True): its gradients are "
    "computed by a fused two-pass algorithm, not by differentiable operations"
)


def refuse_double_backward() -> None:
    """Call first in a fused backward: grad mode is on there exactly when create_graph=True."""
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def reduce(losses: Tensor, reduction: str) -> Tensor:
    """The (B,) per-row losses reduced as `reduction` asks ("mean", "sum" or "none")."""
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def row_weight(options: GISTOptions, batch: int) -> float:
    """d loss / d loss_i for the scalar reductions: 1/B for "mean", 1 for "sum"."""
    return 1.0 / batch if options.reduction == "mean" else 1.0


def one_pass_matryoshka(backend_fn):
    """Mark a backend function as computing ``options.matryoshka_dims`` itself (one pass over the
    candidates for all prefix dims); unmarked backends get one call per dim (`backends.run`)."""
    backend_fn.one_pass_matryoshka = True
    return backend_fn


def has_one_pass_matryoshka(backend_fn) -> bool:
    return bool(getattr(backend_fn, "one_pass_matryoshka", False))
