"""Run sentence-transformers' ``GISTEmbedLoss`` on given embeddings, without any model.

``GISTEmbedLoss.forward`` gets its embeddings from the module-level ``embed_columns`` of
``sentence_transformers.sentence_transformer.losses.gist_embed``, called once with the student
model and once with the guide. This helper builds the loss without running its ``__init__`` (which
wants two real models with tokenizers), gives it two sentinel objects as model and guide, and
swaps ``embed_columns`` for a function that returns the given student tensors for the model
sentinel and the given guide tensors for the guide sentinel. Everything after that is
sentence-transformers' own code, untouched: the similarity matrices, the false-negative masks, the
concatenation and the cross-entropy.

It depends on sentence-transformers and torch only (not on gist_fast), so tests and benchmarks can
use it as an independent oracle.

Example:
    >>> import torch
    >>> from benchmarks.st_injection import st_gist_loss
    >>> a, p, n = torch.randn(3, 8, 16, requires_grad=True).unbind(0)
    >>> ga, gp, gn = torch.randn(3, 8, 32).unbind(0)
    >>> st_gist_loss(a, p, ga, gp, n, gn, temperature=0.05).backward()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

# A loss in sentence-transformers 6.x; older releases kept it in sentence_transformers.losses.
try:
    from sentence_transformers.sentence_transformer.losses import gist_embed as _gist_module
except ImportError:  # pragma: no cover - sentence-transformers < 6
    from sentence_transformers.losses import GISTEmbedLoss as _GISTEmbedLoss

    _gist_module = __import__(_GISTEmbedLoss.__module__, fromlist=["GISTEmbedLoss"])

GISTEmbedLoss = _gist_module.GISTEmbedLoss


class _Sentinel:
    """Stands in for a SentenceTransformer; only its identity matters."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<injected {self.name}>"


def make_st_gist_loss(
    *,
    temperature: float = 0.01,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
) -> GISTEmbedLoss:
    """A ``GISTEmbedLoss`` with the given options and sentinel model/guide (no gathering)."""
    if margin_strategy not in ("absolute", "relative"):
        raise ValueError("margin_strategy must be 'absolute' or 'relative'.")
    loss = object.__new__(GISTEmbedLoss)
    nn.Module.__init__(loss)
    loss.model = _Sentinel("model")
    loss.guide = _Sentinel("guide")
    loss.temperature = temperature
    loss.similarity_fct = nn.CosineSimilarity(dim=-1)
    loss.margin_strategy = margin_strategy
    loss.margin = margin
    loss.contrast_anchors = contrast_anchors
    loss.contrast_positives = contrast_positives
    loss.gather_across_devices = False
    loss.must_retokenize = False
    loss.cross_entropy_loss = nn.CrossEntropyLoss()
    return loss


@contextlib.contextmanager
def injected_embeddings(loss: GISTEmbedLoss, student: Sequence[Tensor], guide: Sequence[Tensor]) -> Iterator[None]:
    """While active, ``loss`` sees `student` as its model's column embeddings and `guide` as the guide's."""
    if len(student) != len(guide):
        raise ValueError(f"student and guide need the same number of columns; got {len(student)} and {len(guide)}")
    original = _gist_module.embed_columns

    def fake_embed_columns(model, features_list, *args, **kwargs):
        if model is loss.model:
            return list(student)
        if model is loss.guide:
            return list(guide)
        return original(model, features_list, *args, **kwargs)

    _gist_module.embed_columns = fake_embed_columns
    try:
        yield
    finally:
        _gist_module.embed_columns = original


def st_gist_loss(
    anchor: Tensor,
    positive: Tensor,
    guide_anchor: Tensor,
    guide_positive: Tensor,
    negative: Tensor | None = None,
    guide_negative: Tensor | None = None,
    *,
    loss: GISTEmbedLoss | None = None,
    **options,
) -> Tensor:
    """sentence-transformers' GISTEmbedLoss (mean reduction) on these embeddings.

    `options` are those of `make_st_gist_loss`; pass a prebuilt `loss` instead to reuse one.
    At most one negative column, as GISTEmbedLoss accepts (anchor, positive[, negative]).
    """
    if loss is None:
        loss = make_st_gist_loss(**options)
    elif options:
        raise TypeError("pass either a prebuilt loss or options, not both")
    student = [anchor, positive] + ([] if negative is None else [negative])
    guide = [guide_anchor, guide_positive] + ([] if guide_negative is None else [guide_negative])
    features = [{} for _ in student]  # never looked at: embed_columns is replaced
    with injected_embeddings(loss, student, guide):
        return loss(features, labels=None)
