"""Drop-in replacements for sentence-transformers' ``GISTEmbedLoss`` and ``CachedGISTEmbedLoss``.

Change one import and keep the rest of the training script::

    # from sentence_transformers.losses import GISTEmbedLoss, CachedGISTEmbedLoss
    from gist_fast.integrations.sentence_transformers import GISTEmbedLoss, CachedGISTEmbedLoss

The classes subclass sentence-transformers' own, so they embed exactly as those do (merged column
forwards, re-tokenisation for the guide when the tokenizers differ, GradCache mini-batches with
replayed RNG state and the backward hook), take the same constructor arguments with the same
defaults, and work inside ``MatryoshkaLoss``. Only the loss on the embeddings is replaced: it is
computed by `gist_fast.gist_loss`, whose memory is linear in the batch (sentence-transformers builds
B x N x d tensors to compute cosine similarities by broadcasting) and which runs a fused Triton kernel
on CUDA. The extra ``backend`` argument picks the `gist_fast.gist_loss` backend. The model card a
trained model gets names and links the loss as sentence-transformers' own card does, with its
parameters, plus one line saying that gist-fast computed it (and with which backend). `MatryoshkaLoss`
is sentence-transformers' own, except that around these losses it computes every dim in one pass.

One difference, by design: exact ties are decided exactly. A candidate whose guide embedding is
bitwise the positive's (a negative that is another row's positive, a positive repeated across rows,
a positive equal to its anchor) has guide similarity equal to the threshold's in exact arithmetic;
gist-fast keeps it at margin 0 and masks it at a positive margin, on every backend, where
sentence-transformers' result depends on float rounding. Inputs without such repeats give the same
loss as sentence-transformers'.

This module needs ``sentence-transformers`` (tested with 6.2 and 6.0.1; see
`_check_cached_retokenisation` for 6.0-6.1); ``import gist_fast`` does not import it.
"""

from __future__ import annotations

import inspect
import random
import re
import types
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from .. import backends as _backends
from ..loss import gist_loss

try:  # sentence-transformers >= 5.4 moved the losses; the old paths still work there but warn.
    from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss as _STCachedGISTEmbedLoss
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss as _STGISTEmbedLoss
except ImportError:  # pragma: no cover - older sentence-transformers
    try:
        from sentence_transformers.losses import CachedGISTEmbedLoss as _STCachedGISTEmbedLoss
        from sentence_transformers.losses import GISTEmbedLoss as _STGISTEmbedLoss
    except ImportError as error:
        raise ImportError(
            "gist_fast.integrations.sentence_transformers needs sentence-transformers: "
            "pip install 'sentence-transformers>=5'"
        ) from error
import sentence_transformers
from sentence_transformers.util import batch_to_device, fullname

try:
    from sentence_transformers.base.model_card import get_losses as _get_losses
except ImportError:  # pragma: no cover - sentence-transformers < 6
    try:
        from sentence_transformers.model_card import get_losses as _get_losses
    except ImportError:
        _get_losses = None

try:
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss as _STMatryoshkaLoss
except ImportError:  # pragma: no cover - older sentence-transformers
    from sentence_transformers.losses import MatryoshkaLoss as _STMatryoshkaLoss

try:  # sentence-transformers 6: one merged forward for the candidate columns.
    from sentence_transformers.base.losses.merged_forward import embed_columns as _embed_columns
except ImportError:  # pragma: no cover - older sentence-transformers embed column by column

    def _embed_columns(model, features_list):
        return [model(features)["sentence_embedding"] for features in features_list]


__all__ = ["GISTEmbedLoss", "CachedGISTEmbedLoss", "MatryoshkaLoss"]

_HAS_MINI_BATCH_NUM_TOKENS = "mini_batch_num_tokens" in inspect.signature(_STCachedGISTEmbedLoss.__init__).parameters

GIST_CITATION = """
@misc{solatorio2024gistembed,
    title={GISTEmbed: Guided In-sample Selection of Training Negatives for Text Embedding Fine-tuning},
    author={Aivin V. Solatorio},
    year={2024},
    eprint={2402.16829},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""

GRADCACHE_CITATION = """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""


def _version(text: str) -> tuple[int, int]:
    major, minor = (re.findall(r"\d+", text) + ["0", "0"])[:2]
    return int(major), int(minor)


_ST_VERSION = _version(getattr(sentence_transformers, "__version__", "0.0"))


def _check_cached_retokenisation(must_retokenize: bool, st_version: tuple[int, int]) -> None:
    """sentence-transformers 6.0 and 6.1's ``CachedGISTEmbedLoss`` (whose embedding this class
    inherits) crash on the first batch when the guide re-tokenises: their ``embed_minibatch`` calls
    ``.to(device)`` on every value the guide's ``preprocess`` returns, a string among them
    (``AttributeError: 'str' object has no attribute 'to'``); 6.2 fixed it. Say so up front."""
    if must_retokenize and (6, 0) <= st_version < (6, 2):
        raise ValueError(
            f"CachedGISTEmbedLoss: the guide needs re-tokenising (its tokenizer or max_seq_length differs "
            f"from the model's), which sentence-transformers {st_version[0]}.{st_version[1]}'s cached "
            "embedding cannot do (it fails with \"'str' object has no attribute 'to'\"; fixed in 6.2). "
            "Upgrade with pip install 'sentence-transformers>=6.2', or use GISTEmbedLoss."
        )


def _check_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend not in _backends.BACKENDS:
        raise ValueError(f"backend must be one of {_backends.BACKENDS}; got {backend!r}")
    return backend


def _decode_for_guide(loss: Any, sentence_feature: dict[str, Any]) -> dict[str, Any]:
    """The student's tokens back to text, then tokenised by the guide (as sentence-transformers does)."""
    input_ids = sentence_feature["input_ids"]
    if "cu_seq_lens_q" in sentence_feature:  # flattened (FA2 unpadded) batch
        flat_input_ids = input_ids[0].tolist()
        cu_seq_lens = sentence_feature["cu_seq_lens_q"].tolist()
        input_ids = [flat_input_ids[start:end] for start, end in zip(cu_seq_lens[:-1], cu_seq_lens[1:], strict=True)]
    decoded = loss.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    return batch_to_device(loss.guide.preprocess(decoded), loss.guide.device)


def _columns(what: str, student: list[Tensor], guide: list[Tensor]) -> None:
    if len(student) < 2:
        raise ValueError(
            f"{what} needs at least 2 input columns (anchor, positive[, negative_1, ...]); got {len(student)}"
        )
    if len(student) != len(guide):
        raise ValueError(f"reps and reps_guided must have the same length; got {len(student)} and {len(guide)}")


def _sentence_transformers_class(cls: type) -> type:
    """The first sentence-transformers class in `cls`'s ancestry: the one whose docs describe it."""
    return next(base for base in cls.__mro__ if base.__module__.startswith("sentence_transformers."))


def _compute_dataset_metrics(card: Any, dataset: Any, dataset_info: dict, loss: Any, *args, **kwargs) -> dict:
    """sentence-transformers' ``compute_dataset_metrics`` (the model card's per-dataset entry), then
    the entry of a gist-fast loss made to read as theirs: their class name with its link to their
    documentation (the card links only classes of sentence-transformers' own modules), and a line
    saying that gist-fast computed it and with which backend."""
    info = type(card).compute_dataset_metrics(card, dataset, dataset_info, loss, *args, **kwargs)
    ours = [part for part in _get_losses(loss) if type(part).__module__ == __name__]
    if not ours or "loss" not in info:
        return info
    if type(loss).__module__ == __name__:
        info["loss"]["fullname"] = fullname(_sentence_transformers_class(type(loss)))
    computed = [part for part in ours if isinstance(part, (GISTEmbedLoss, CachedGISTEmbedLoss))]
    if computed:
        names = ", ".join(dict.fromkeys(f"`{fullname(part)}`" for part in computed))
        backends = ", ".join(dict.fromkeys(repr(part.backend) for part in computed))
        line = (
            f"Computed by gist-fast's drop-in {names} (backend {backends}): the same loss and gradients, "
            "with memory linear in the batch."
        )
        info["loss"]["config_code"] = info["loss"].get("config_code", "") + f"\n\n  {line}"
    return info


_compute_dataset_metrics.__name__ = "compute_dataset_metrics"  # a bound copy pickles by this name


def _describe_on_model_card(model: Any) -> None:
    """Route `model`'s model-card entries for its training datasets through
    `_compute_dataset_metrics` (once per model; other losses' entries are left as they are)."""
    card = getattr(model, "model_card_data", None)
    if _get_losses is None or not hasattr(card, "compute_dataset_metrics"):
        return
    if "compute_dataset_metrics" not in vars(card):
        card.compute_dataset_metrics = types.MethodType(_compute_dataset_metrics, card)


class GISTEmbedLoss(_STGISTEmbedLoss):
    backend: str = "auto"  # also for instances built without __init__ (cls.__new__ + attributes)

    def __init__(
        self,
        model,
        guide,
        temperature: float = 0.01,
        margin_strategy: Literal["absolute", "relative"] = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        gather_across_devices: bool = False,
        backend: str = "auto",
    ) -> None:
        """sentence-transformers' ``GISTEmbedLoss``, with the loss computed by `gist_fast.gist_loss`.

        Trains a SentenceTransformer with the GISTEmbed objective: a frozen guide model decides which
        in-batch candidates are false negatives, and those are left out of the softmax. Embedding
        (including the guide's re-tokenisation when the tokenizers differ) is sentence-transformers'
        own; the loss on the embeddings is gist-fast's, which gives the same value and gradients
        with memory linear in the batch instead of B x N x d.

        Candidates whose guide similarity to the anchor exceeds a threshold are discarded:

            - "absolute": ``guide(anchor, candidate) > guide(anchor, positive) - margin``
            - "relative": ``guide(anchor, candidate) > guide(anchor, positive) - |guide(anchor, positive)| * margin``

        Args:
            model: SentenceTransformer model to train (based on a `transformers` model).
            guide: SentenceTransformer model that guides the in-batch negative selection (frozen).
            temperature: cosine similarities are divided by this. Inverse of the ``scale`` of
                ``MultipleNegativesRankingLoss``. Defaults to 0.01.
            margin_strategy: ``"absolute"`` or ``"relative"``, see above.
            margin: the margin of the false-negative filter. Defaults to 0.0: with ``"absolute"``
                this drops only candidates the guide finds closer to the anchor than the positive.
            contrast_anchors: add the anchor-anchor similarities (pushes anchors apart). Default True,
                as in the GISTEmbed paper.
            contrast_positives: add the positive-positive similarities. Default True, as in the paper;
                False may suit some retrieval tasks.
            gather_across_devices: all-gather positives, negatives and their guide embeddings over
                torch.distributed (with gradient) so each process scores its anchors against every
                process's candidates. Recommended on several GPUs.
            backend: the `gist_fast.gist_loss` backend: ``"auto"`` (Triton on CUDA, tiled PyTorch
                elsewhere), ``"torch"``, ``"reference"`` or another registered one.

        References:
            - GISTEmbed: https://arxiv.org/abs/2402.16829

        Requirements:
            1. (anchor, positive) pairs, or (anchor, positive, negative_1, ..., negative_n): unlike
               sentence-transformers' class, any number of negative columns is accepted.

        Inputs:
            +-------------------------------------------------+--------+
            | Inputs                                          | Labels |
            +=================================================+========+
            | (anchor, positive) pairs                        | none   |
            +-------------------------------------------------+--------+
            | (anchor, positive, negative) triplets           | none   |
            +-------------------------------------------------+--------+
            | (anchor, positive, negative_1, ..., negative_n) | none   |
            +-------------------------------------------------+--------+

        Recommendations:
            - Use ``BatchSamplers.NO_DUPLICATES`` so that no in-batch candidate duplicates an anchor
              or a positive.

        Relations:
            - :class:`CachedGISTEmbedLoss` gives the same loss with GradCache mini-batches, for
              batches larger than the encoder's activations allow.

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

                from gist_fast.integrations.sentence_transformers import GISTEmbedLoss

                model = SentenceTransformer("microsoft/mpnet-base")
                guide = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
                train_dataset = Dataset.from_dict({
                    "anchor": ["It's nice weather outside today.", "He drove to work."],
                    "positive": ["It's so sunny.", "He took the car to the office."],
                })
                loss = GISTEmbedLoss(model, guide)

                trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
                trainer.train()
        """
        super().__init__(
            model,
            guide,
            temperature=temperature,
            margin_strategy=margin_strategy,
            margin=margin,
            contrast_anchors=contrast_anchors,
            contrast_positives=contrast_positives,
            gather_across_devices=gather_across_devices,
        )
        self.backend = _check_backend(backend)
        _describe_on_model_card(model)

    def embed(self, sentence_features: Iterable[dict[str, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
        """Student embeddings (with gradient) and guide embeddings (without) of every input column,
        computed exactly as sentence-transformers' ``GISTEmbedLoss.forward`` computes them."""
        sentence_features = list(sentence_features)
        # Run the guide on shallow copies: it writes its outputs into the features it is given, and
        # loss decorators like MatryoshkaLoss reuse the dicts the model filled.
        guide_features = [dict(sentence_feature) for sentence_feature in sentence_features]
        embeddings = _embed_columns(self.model, sentence_features)
        with torch.no_grad():
            if self.must_retokenize:
                guide_features = [_decode_for_guide(self, feature) for feature in sentence_features]
            guide_embeddings = _embed_columns(self.guide, guide_features)
        return list(embeddings), list(guide_embeddings)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        embeddings, guide_embeddings = self.embed(sentence_features)
        return _gist_loss_of_columns(self, embeddings, guide_embeddings)

    @property
    def citation(self) -> str:
        return GIST_CITATION


class CachedGISTEmbedLoss(_STCachedGISTEmbedLoss):
    backend: str = "auto"  # also for instances built without __init__ (cls.__new__ + attributes)

    def __init__(
        self,
        model,
        guide,
        temperature: float = 0.01,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        show_progress_bar: bool = False,
        margin_strategy: Literal["absolute", "relative"] = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        gather_across_devices: bool = False,
        backend: str = "auto",
    ) -> None:
        """sentence-transformers' ``CachedGISTEmbedLoss``, with the loss computed by `gist_fast.gist_loss`.

        GISTEmbed (a guide model filters in-batch false negatives, see :class:`GISTEmbedLoss`) with
        Gradient Cache: (1) every column is embedded in mini-batches without gradient, student and
        guide, saving each mini-batch's RNG state; (2) the loss over the whole batch and its
        gradient with respect to the embeddings are computed; (3) in the backward pass each
        mini-batch is embedded again with gradient, replaying its RNG state, and the cached
        gradient is back-propagated. Steps (1) and (3) are sentence-transformers' own; step (2) is
        one call of `gist_fast.gist_loss` over the whole batch, memory linear in it, instead of
        sentence-transformers' per-mini-batch B x N x d broadcasts.

        Args:
            model: SentenceTransformer model to train.
            guide: SentenceTransformer model that guides the in-batch negative selection (frozen).
            temperature: cosine similarities are divided by this. Defaults to 0.01.
            mini_batch_size: rows per embedding mini-batch in steps (1) and (3): the larger, the
                faster and the more memory. Defaults to 32. (The loss itself needs no mini-batches.)
            mini_batch_num_tokens: if set, pack the embedding mini-batches by non-padding token count
                instead of by ``mini_batch_size`` rows (sentence-transformers >= 6).
            show_progress_bar: show a progress bar over the mini-batches. Defaults to False.
            margin_strategy: ``"absolute"`` or ``"relative"`` (see :class:`GISTEmbedLoss`).
            margin: the margin of the false-negative filter. Defaults to 0.0.
            contrast_anchors: add the anchor-anchor similarities. Defaults to True.
            contrast_positives: add the positive-positive similarities. Defaults to True.
            gather_across_devices: all-gather the candidates and their guide embeddings over
                torch.distributed, with gradient (see `gist_fast.gist_loss`).
            backend: the `gist_fast.gist_loss` backend (``"auto"``, ``"torch"``, ``"reference"``, ...).

        References:
            - GISTEmbed: https://arxiv.org/abs/2402.16829
            - Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup (GradCache):
              https://arxiv.org/abs/2101.06983

        Requirements:
            1. (anchor, positive) pairs or (anchor, positive, negative_1, ..., negative_n)
            2. Large batch sizes, which is what it is for.

        Inputs:
            +-------------------------------------------------+--------+
            | Inputs                                          | Labels |
            +=================================================+========+
            | (anchor, positive) pairs                        | none   |
            +-------------------------------------------------+--------+
            | (anchor, positive, negative) triplets           | none   |
            +-------------------------------------------------+--------+
            | (anchor, positive, negative_1, ..., negative_n) | none   |
            +-------------------------------------------------+--------+

        Relations:
            - Same loss as :class:`GISTEmbedLoss`, with caching that allows much larger batches.

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

                from gist_fast.integrations.sentence_transformers import CachedGISTEmbedLoss

                model = SentenceTransformer("microsoft/mpnet-base")
                guide = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
                train_dataset = Dataset.from_dict({
                    "anchor": ["It's nice weather outside today.", "He drove to work."],
                    "positive": ["It's so sunny.", "He took the car to the office."],
                })
                loss = CachedGISTEmbedLoss(model, guide, mini_batch_size=64, margin=0.1)

                trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
                trainer.train()
        """
        kwargs = {}
        if _HAS_MINI_BATCH_NUM_TOKENS:
            kwargs["mini_batch_num_tokens"] = mini_batch_num_tokens
        elif mini_batch_num_tokens is not None:  # pragma: no cover - sentence-transformers < 6
            raise ValueError("mini_batch_num_tokens needs sentence-transformers >= 6; leave it at None")
        super().__init__(
            model,
            guide,
            temperature=temperature,
            mini_batch_size=mini_batch_size,
            show_progress_bar=show_progress_bar,
            margin_strategy=margin_strategy,
            margin=margin,
            contrast_anchors=contrast_anchors,
            contrast_positives=contrast_positives,
            gather_across_devices=gather_across_devices,
            **kwargs,
        )
        self.backend = _check_backend(backend)
        _describe_on_model_card(model)
        _check_cached_retokenisation(self.must_retokenize, _ST_VERSION)

    def calculate_loss(
        self, reps: list[list[Tensor]], reps_guided: list[list[Tensor]], *, with_backward: bool = False
    ) -> Tensor:
        """The loss over the whole batch from per-mini-batch embeddings (one list per column).

        With ``with_backward``, back-propagate it to the embeddings (filling their ``.grad``, the
        gradient cache) and return it detached, as sentence-transformers' ``calculate_loss`` does.
        """
        _columns(type(self).__name__, reps, reps_guided)
        loss = _gist_loss_of_columns(self, [torch.cat(r) for r in reps], [torch.cat(r) for r in reps_guided])
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    @property
    def citation(self) -> str:
        return GIST_CITATION + GRADCACHE_CITATION


def _gist_loss_of_columns(
    loss: GISTEmbedLoss | CachedGISTEmbedLoss,
    columns: list[Tensor],
    guide_columns: list[Tensor],
    dims: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """`gist_loss` with `loss`'s options on the embedding columns (anchor, positive, negatives...) and
    the guide's; with `dims`, ``sum_m w_m * L(columns[..., :m])`` in the same one call."""
    _columns(type(loss).__name__, columns, guide_columns)
    device = columns[0].device
    guide_columns = [g.to(device) for g in guide_columns]
    return gist_loss(
        columns[0],
        columns[1],
        guide_columns[0],
        guide_columns[1],
        columns[2:] or None,
        guide_columns[2:] or None,
        temperature=loss.temperature,
        margin_strategy=loss.margin_strategy,
        margin=loss.margin,
        contrast_anchors=loss.contrast_anchors,
        contrast_positives=loss.contrast_positives,
        gather_across_devices=loss.gather_across_devices,
        backend=getattr(loss, "backend", "auto"),
        matryoshka_dims=None if dims is None else tuple(dims),
        matryoshka_weights=None if weights is None else tuple(weights),
    )


class _OnePassCachedLoss:
    """Replaces a `CachedGISTEmbedLoss`'s ``calculate_loss`` inside `MatryoshkaLoss`: the loss of
    every sampled dim from one `gist_loss` call on the cached embeddings (sentence-transformers'
    ``CachedLossDecorator`` calls the loss once per dim instead)."""

    def __init__(self, matryoshka: MatryoshkaLoss) -> None:
        self.matryoshka = matryoshka

    def __call__(
        self, reps: list[list[Tensor]], reps_guided: list[list[Tensor]], *, with_backward: bool = False
    ) -> Tensor:
        dims, weights = self.matryoshka._dims_of_this_step(sort=False)
        columns, guide_columns = [torch.cat(r) for r in reps], [torch.cat(r) for r in reps_guided]
        loss = _gist_loss_of_columns(self.matryoshka.loss, columns, guide_columns, dims, weights)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss


class MatryoshkaLoss(_STMatryoshkaLoss):
    def __init__(
        self,
        model,
        loss: torch.nn.Module,
        matryoshka_dims: Sequence[int],
        matryoshka_weights: Sequence[float] | Sequence[int] | None = None,
        n_dims_per_step: int = -1,
    ) -> None:
        """sentence-transformers' ``MatryoshkaLoss``, computing a GIST loss's dims in one pass.

        Trains one model for several embedding sizes: the loss is ``sum_m w_m * loss(embeddings
        truncated to their first m features)``. Same arguments, defaults and behaviour as
        sentence-transformers' class (it is a subclass); when ``loss`` is this module's
        `GISTEmbedLoss` or `CachedGISTEmbedLoss`, every dim's loss comes from one call of
        `gist_fast.gist_loss` with ``matryoshka_dims``: the model and the guide embed once, the
        guide's mask is computed once for all dims, and the student dots of all prefixes come
        from one sweep over the features. sentence-transformers computes one full GIST loss per
        dim instead, guide similarities included. Any other loss is wrapped exactly as
        sentence-transformers does.

        Args:
            model: the SentenceTransformer being trained.
            loss: the loss to apply at every dim, e.g. ``GISTEmbedLoss(model, guide)``.
            matryoshka_dims: the embedding sizes, e.g. ``[768, 512, 256, 128, 64]``; each in
                [1, the model's dim].
            matryoshka_weights: one weight per dim; None: all 1.
            n_dims_per_step: when > 0, use a random sample of this many dims per step (drawn with
                Python's ``random`` as sentence-transformers draws them); -1 (default): all dims.

        References:
            - Matryoshka Representation Learning: https://arxiv.org/abs/2205.13147

        Example:
            ::

                from gist_fast.integrations.sentence_transformers import GISTEmbedLoss, MatryoshkaLoss

                loss = MatryoshkaLoss(model, GISTEmbedLoss(model, guide), [768, 512, 256, 128, 64])
        """
        super().__init__(model, loss, matryoshka_dims, matryoshka_weights, n_dims_per_step)
        # A guide that is the model itself is truncated too by sentence-transformers (it runs the
        # decorated forward): keep their per-dim path there.
        self.one_pass = isinstance(loss, (GISTEmbedLoss, CachedGISTEmbedLoss)) and loss.guide is not model
        if self.one_pass and self.uses_gradient_cache:
            loss.calculate_loss = _OnePassCachedLoss(self)  # instead of their CachedLossDecorator

    def _dims_of_this_step(self, sort: bool) -> tuple[list[int], list[float]]:
        """The dims (and their weights) of this step: all of them, or ``n_dims_per_step`` drawn by
        the same ``random.sample`` call as sentence-transformers' (sorted as their plain path sorts)."""
        indices = range(len(self.matryoshka_dims))
        if 0 < self.n_dims_per_step < len(indices):
            indices = random.sample(indices, self.n_dims_per_step)
            if sort:
                indices.sort()
        return [self.matryoshka_dims[i] for i in indices], [self.matryoshka_weights[i] for i in indices]

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        if not self.one_pass or self.uses_gradient_cache:
            # Theirs, or the cached loss, whose calculate_loss computes every dim in one pass.
            return super().forward(sentence_features, labels)
        dims, weights = self._dims_of_this_step(sort=True)
        embeddings, guide_embeddings = self.loss.embed(sentence_features)
        return _gist_loss_of_columns(self.loss, list(embeddings), list(guide_embeddings), dims, weights)
