"""One GradCache step of GIST training: a contrastive batch far larger than the encoder can hold.

(1) Encode every text of the batch in mini-batches without grad, saving each mini-batch's RNG
state; (2) compute ``gist_loss`` on the whole batch of embeddings and its gradient with respect to
them; (3) re-encode each mini-batch with grad, replaying its RNG state so dropout draws the same
masks, and backpropagate the cached embedding gradients. The parameter gradients equal those of one
full-batch forward and backward (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size
under Memory Limited Setup").

Texts of all columns are pooled and sorted by token length before being cut into mini-batches, so
each mini-batch pads to similar lengths; the loss does not depend on that grouping.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import gist_loss
from .distributed import global_anchor_block
from .encoders import Encoder, autocast
from .tokens import TokenCache, TokenizedPool, to_device, tokenize_pool  # noqa: F401 - TokenizedPool: re-exported


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) of a training step is NaN or Inf."""


@dataclass
class LossOptions:
    """Options forwarded to :func:`gist_fast.gist_loss` (see its docstring).

    With ``matryoshka_dims`` the step's loss, and so the embedding gradients it caches, are the
    Matryoshka loss's (the weighted sum over sizes m of the loss of the first m features).

    Example:
        >>> LossOptions(temperature=0.05, matryoshka_dims=(32, 16)).kwargs()["matryoshka_dims"]
        (32, 16)
    """

    temperature: float = 0.01
    margin_strategy: str = "absolute"
    margin: float = 0.0
    contrast_anchors: bool = True
    contrast_positives: bool = True
    backend: str = "auto"
    gather_across_devices: bool = False
    matryoshka_dims: Sequence[int] | None = None
    matryoshka_weights: Sequence[float] | None = None

    def kwargs(self) -> dict[str, Any]:
        return dict(self.__dict__)


class RandContext:
    """Capture the CPU (and CUDA) RNG state now; entering the context replays it, leaving restores.

    Example:
        >>> state = RandContext(torch.device("cpu"))
        >>> a = torch.rand(2)
        >>> with state:
        ...     b = torch.rand(2)
        >>> bool((a == b).all())
        True
    """

    def __init__(self, device: torch.device) -> None:
        self.devices = [device] if device.type == "cuda" else []
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.devices]
        self._fork: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        for d, s in zip(self.devices, self.cuda_states, strict=True):
            torch.cuda.set_rng_state(s, d)

    def __exit__(self, *exc) -> None:
        assert self._fork is not None
        self._fork.__exit__(*exc)
        self._fork = None


class StepPhases:
    """Times of a GradCache step's phases: tokenize, encode (no grad), loss, reencode (with grad).

    On CUDA the boundaries are CUDA events recorded on the stream (no host synchronisation), read
    with :meth:`seconds` once the step has finished; elsewhere they are host clock readings.

    Example:
        >>> phases = StepPhases(torch.device("cpu"))
        >>> loss = gradcache_step(student, cols, guide_cols, mini_batch_size=32, phases=phases)  # doctest: +SKIP
        >>> phases.seconds()  # doctest: +SKIP
        {'tokenize': 0.01, 'encode': 0.4, 'loss': 0.02, 'reencode': 1.1}
    """

    NAMES = ("tokenize", "encode", "loss", "reencode")

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[Any] = []

    def mark(self) -> None:
        """Record a phase boundary (the first call: the step's start)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def seconds(self) -> dict[str, float]:
        """Seconds per phase; waits for the last boundary on CUDA. Empty unless every boundary was marked."""
        if len(self._marks) != len(self.NAMES) + 1:
            return {}
        if self.cuda:
            self._marks[-1].synchronize()
            spans = [a.elapsed_time(b) / 1000 for a, b in zip(self._marks[:-1], self._marks[1:], strict=True)]
        else:
            spans = [b - a for a, b in zip(self._marks[:-1], self._marks[1:], strict=True)]
        return {name: round(s, 6) for name, s in zip(self.NAMES, spans, strict=True)}


def gradcache_step(
    encoder: Encoder,
    columns: list[list[str]],
    guide_columns: list[Tensor],
    *,
    mini_batch_size: int,
    loss_options: LossOptions | None = None,
    autocast_dtype: torch.dtype | None = None,
    sort_by_length: bool = True,
    phases: StepPhases | None = None,
    token_cache: TokenCache | None = None,
) -> Tensor:
    """Run one GradCache forward/backward: parameter ``.grad`` of ``encoder`` is accumulated.

    Args:
        encoder: the student (in train mode for dropout; its parameters receive gradients).
        columns: ``[anchors, positives, negatives_1, ...]``, B strings each.
        guide_columns: the guide's embeddings of the same columns, (B, dg) each, on the student's device.
        mini_batch_size: texts per encoder forward pass (activation memory scales with it).
        loss_options: forwarded to :func:`gist_fast.gist_loss` (Matryoshka sizes included).
        autocast_dtype: e.g. ``torch.bfloat16`` on CUDA; None runs in the weights' dtype.
        sort_by_length: group texts of similar token length into mini-batches (less padding).
        phases: a :class:`StepPhases` to time the step's phases (read it after the step).
        token_cache: a :class:`~gist_fast.training.tokens.TokenCache` of the encoder's tokenizer and
            token limit, kept between steps: a text is tokenized once per training run.

    Returns:
        The loss, a detached scalar on the CPU. Its value is read from the device once, for the
        finiteness check between the loss and the re-encoding; nothing else in the step waits for
        the device (no per-mini-batch reads: indices and features go over asynchronously).

    Raises:
        NonFiniteLossError when the loss is NaN or Inf (before any gradient reaches the encoder).

    Example:
        >>> cols = [anchors, positives]  # doctest: +SKIP
        >>> loss = gradcache_step(student, cols, table.batch(rows), mini_batch_size=32)  # doctest: +SKIP
        >>> optimizer.step()  # doctest: +SKIP
    """
    if mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be >= 1; got {mini_batch_size}")
    if len(columns) < 2 or len(columns) != len(guide_columns):
        raise ValueError(
            f"need [anchors, positives, *negatives] and one guide tensor per column; got {len(columns)} "
            f"columns and {len(guide_columns)} guide tensors"
        )
    opts = (loss_options or LossOptions()).kwargs()
    mark = phases.mark if phases is not None else (lambda: None)
    mark()
    batch = len(columns[0])
    texts = [t for col in columns for t in col]
    pool = tokenize_pool(encoder, texts, mini_batch_size, sort_by_length, cache=token_cache)
    device = encoder.device
    on_cuda = device.type == "cuda"
    # every mini-batch's row indices go to the device in one copy; features are padded once (pinned
    # on CUDA) and used by both passes
    sizes = [len(c) for c in pool.chunks]
    chunk_rows = to_device(torch.cat(pool.chunks), device).split(sizes)
    features = [pool.features(c, pin_memory=on_cuda) for c in range(len(pool.chunks))]
    mark()

    # (1) embeddings of every text, no grad, RNG state saved per mini-batch
    reps = torch.empty(len(texts), encoder.dim, dtype=torch.float32, device=device)
    states: list[RandContext] = []
    with torch.no_grad():
        for rows, feats in zip(chunk_rows, features, strict=True):
            states.append(RandContext(device))
            with autocast(device, autocast_dtype):
                reps.index_copy_(0, rows, encoder(feats).float())
    mark()

    # (2) the loss on the whole batch and its gradient with respect to the embeddings
    reps.requires_grad_(True)
    cols = reps.split(batch)
    negatives = list(cols[2:]) or None
    guide_neg = list(guide_columns[2:]) or None
    # under torch.distributed: anchors contrasted with every rank's anchors (the global batch's loss)
    negatives, guide_neg, opts = global_anchor_block(cols[0], guide_columns[0], negatives, guide_neg, opts)
    loss = gist_loss(cols[0], cols[1], guide_columns[0], guide_columns[1], negatives, guide_neg, **opts)
    value = loss.item()  # the step's one read of the loss: a NaN must stop it before any backward
    if not math.isfinite(value):
        raise NonFiniteLossError(f"the loss is {value}")
    (grad,) = torch.autograd.grad(loss, reps)
    mark()

    # (3) re-encode with grad, replaying the RNG state, and push the cached gradients through
    for rows, feats, state in zip(chunk_rows, features, states, strict=True):
        with state, autocast(device, autocast_dtype):
            emb = encoder(feats)
        emb.float().backward(grad.index_select(0, rows))
    mark()
    return torch.tensor(value, dtype=loss.dtype)
