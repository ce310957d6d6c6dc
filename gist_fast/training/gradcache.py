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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import gist_loss
from .distributed import global_anchor_block
from .encoders import Encoder, autocast


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) of a training step is NaN or Inf."""


@dataclass
class LossOptions:
    """Options forwarded to :func:`gist_fast.gist_loss` (see its docstring)."""

    temperature: float = 0.01
    margin_strategy: str = "absolute"
    margin: float = 0.0
    contrast_anchors: bool = True
    contrast_positives: bool = True
    backend: str = "auto"
    gather_across_devices: bool = False

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


@dataclass
class TokenizedPool:
    """The batch's texts tokenized once (unpadded) and grouped into length-sorted mini-batches."""

    input_ids: list[list[int]]
    extra: dict[str, list[list[int]]]
    chunks: list[Tensor]
    pad_id: int
    padding_side: str = "right"

    def features(self, c: int) -> dict[str, Tensor]:
        """Padded features of mini-batch ``c``."""
        idx = self.chunks[c].tolist()
        width = max(len(self.input_ids[i]) for i in idx)

        def pad(rows: list[list[int]], value: int) -> Tensor:
            out = np.full((len(rows), width), value, dtype=np.int64)
            for r, row in enumerate(rows):
                if self.padding_side == "left":
                    out[r, width - len(row) :] = row
                else:
                    out[r, : len(row)] = row
            return torch.from_numpy(out)

        ids = [self.input_ids[i] for i in idx]
        feats = {"input_ids": pad(ids, self.pad_id), "attention_mask": pad([[1] * len(r) for r in ids], 0)}
        for name, rows in self.extra.items():
            feats[name] = pad([rows[i] for i in idx], 0)
        return feats


def tokenize_pool(
    encoder: Encoder, texts: list[str], mini_batch_size: int, sort_by_length: bool = True
) -> TokenizedPool:
    """Tokenize ``texts`` once without padding and cut them into mini-batches (longest first)."""
    tok = encoder.tokenizer
    enc = tok(texts, truncation=True, max_length=encoder.max_seq_length, padding=False)
    input_ids = enc["input_ids"]
    extra = {k: enc[k] for k in ("token_type_ids",) if k in enc}
    lengths = torch.tensor([len(x) for x in input_ids])
    order = torch.argsort(lengths, descending=True, stable=True) if sort_by_length else torch.arange(len(texts))
    chunks = list(order.split(mini_batch_size))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    return TokenizedPool(input_ids, extra, chunks, pad_id, getattr(tok, "padding_side", "right"))


def gradcache_step(
    encoder: Encoder,
    columns: list[list[str]],
    guide_columns: list[Tensor],
    *,
    mini_batch_size: int,
    loss_options: LossOptions | None = None,
    autocast_dtype: torch.dtype | None = None,
    sort_by_length: bool = True,
) -> Tensor:
    """Run one GradCache forward/backward: parameter ``.grad`` of ``encoder`` is accumulated.

    Args:
        encoder: the student (in train mode for dropout; its parameters receive gradients).
        columns: ``[anchors, positives, negatives_1, ...]``, B strings each.
        guide_columns: the guide's embeddings of the same columns, (B, dg) each, on the student's device.
        mini_batch_size: texts per encoder forward pass (activation memory scales with it).
        loss_options: forwarded to :func:`gist_fast.gist_loss`.
        autocast_dtype: e.g. ``torch.bfloat16`` on CUDA; None runs in the weights' dtype.
        sort_by_length: group texts of similar token length into mini-batches (less padding).

    Returns:
        The loss (a detached scalar).

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
    batch = len(columns[0])
    texts = [t for col in columns for t in col]
    pool = tokenize_pool(encoder, texts, mini_batch_size, sort_by_length)
    device = encoder.device

    # (1) embeddings of every text, no grad, RNG state saved per mini-batch
    reps = torch.empty(len(texts), encoder.dim, dtype=torch.float32, device=device)
    states: list[RandContext] = []
    features = [pool.features(c) for c in range(len(pool.chunks))]  # padded once, used by both passes
    with torch.no_grad():
        for idx, feats in zip(pool.chunks, features, strict=True):
            states.append(RandContext(device))
            with autocast(device, autocast_dtype):
                reps[idx.to(device)] = encoder(feats).float()

    # (2) the loss on the whole batch and its gradient with respect to the embeddings
    reps.requires_grad_(True)
    cols = reps.split(batch)
    negatives = list(cols[2:]) or None
    guide_neg = list(guide_columns[2:]) or None
    # under torch.distributed: anchors contrasted with every rank's anchors (the global batch's loss)
    negatives, guide_neg, opts = global_anchor_block(cols[0], guide_columns[0], negatives, guide_neg, opts)
    loss = gist_loss(cols[0], cols[1], guide_columns[0], guide_columns[1], negatives, guide_neg, **opts)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"the loss is {loss.item()}")
    (grad,) = torch.autograd.grad(loss, reps)

    # (3) re-encode with grad, replaying the RNG state, and push the cached gradients through
    for idx, feats, state in zip(pool.chunks, features, states, strict=True):
        with state, autocast(device, autocast_dtype):
            emb = encoder(feats)
        emb.float().backward(grad[idx.to(device)])
    return loss.detach()
