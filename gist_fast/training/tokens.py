"""Texts tokenized once, grouped by token length into batches, padded per batch, moved to the device.

Shared by the GradCache step (the student's mini-batches) and :meth:`Encoder.encode` (the guide
cache, evaluation): both cut length-sorted texts into batches, so a batch pads to similar lengths.
A :class:`TokenCache` keeps every text's token ids for the whole training run, so only the first
epoch tokenizes (tokenizing is host work that otherwise costs a large share of a GPU step). Batches
are padded with vectorised numpy (no Python loop over rows), on CUDA straight into pinned host
memory, and copied without blocking the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

# token features besides input_ids that are kept (and padded with 0) when the tokenizer returns them
EXTRA_FEATURES = ("token_type_ids",)


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Copy a host tensor to ``device``; to CUDA from pinned memory without blocking the host.

    A pageable CPU tensor bound for CUDA is pinned first (the copy then overlaps the host's work);
    on the CPU this returns ``tensor`` itself.
    """
    if device.type != "cuda":
        return tensor.to(device)
    if tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class TokenCache:
    """Token ids of every text seen, tokenized once (truncated to ``max_length``, no padding).

    A training run keeps one for the student, so only the first epoch tokenizes; memory grows to the
    data's distinct texts (a few bytes a token plus ~100 bytes a text).

    Args:
        tokenizer: a ``transformers`` tokenizer.
        max_length: token limit.

    Example:
        >>> cache = TokenCache(tokenizer, 128)  # doctest: +SKIP
        >>> cache.rows(["a text", "another"])["input_ids"][0]  # doctest: +SKIP
        array([ 101, 1037, 3793,  102], dtype=int32)
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1; got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.names: tuple[str, ...] = ("input_ids",)
        self._rows: dict[str, tuple[np.ndarray, ...]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def _tokenize(self, texts: list[str]) -> None:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)
        self.names = ("input_ids", *(k for k in EXTRA_FEATURES if k in enc))
        columns = [enc[k] for k in self.names]
        for j, text in enumerate(texts):
            self._rows[text] = tuple(np.asarray(col[j], dtype=np.int32) for col in columns)

    def rows(self, texts: list[str]) -> dict[str, list[np.ndarray]]:
        """Each feature's (unpadded) ids of ``texts``, in order; tokenizes only texts not seen before."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._rows))
        if missing:
            self._tokenize(missing)
        found = [self._rows[t] for t in texts]
        return {name: [r[k] for r in found] for k, name in enumerate(self.names)}


@dataclass
class TokenizedPool:
    """Texts' token ids, concatenated, and their grouping into length-sorted batches.

    Attributes:
        flat: each feature's ids of all texts, concatenated (``input_ids`` and e.g. ``token_type_ids``).
        lengths: (n,) tokens per text; ``offsets``: where each text starts in ``flat``.
        chunks: one int64 tensor of text indices per batch, longest texts first.
        pad_id: the tokenizer's padding id. padding_side: ``"right"`` or ``"left"``.
    """

    flat: dict[str, np.ndarray]
    lengths: np.ndarray
    chunks: list[Tensor]
    pad_id: int
    padding_side: str = "right"
    offsets: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def features(self, c: int, pin_memory: bool = False) -> dict[str, Tensor]:
        """Padded (n, longest) int64 features of batch ``c``, in pinned host memory if ``pin_memory``."""
        idx = self.chunks[c].numpy()
        lengths = self.lengths[idx]
        width = int(lengths.max())
        position = np.arange(width)[None, :]
        if self.padding_side == "left":
            position = position - (width - lengths)[:, None]  # token index at each column (< 0: padding)
        filled = (position >= 0) & (position < lengths[:, None])
        source = (self.offsets[idx][:, None] + position)[filled]  # row-major: each row's tokens in order

        def padded(values: np.ndarray | None, pad: int) -> Tensor:
            out = torch.empty((len(idx), width), dtype=torch.int64, pin_memory=pin_memory)
            view = out.numpy()  # the same memory, filled by numpy (torch's threaded fill costs more here)
            view.fill(pad)
            view[filled] = 1 if values is None else values[source]
            return out

        feats = {"input_ids": padded(self.flat["input_ids"], self.pad_id), "attention_mask": padded(None, 0)}
        for name, values in self.flat.items():
            if name != "input_ids":
                feats[name] = padded(values, 0)
        return feats


def tokenize_pool(
    encoder: Any,
    texts: list[str],
    batch_size: int,
    sort_by_length: bool = True,
    max_length: int | None = None,
    cache: TokenCache | None = None,
) -> TokenizedPool:
    """Tokenize ``texts`` (or take them from ``cache``) and cut them into batches of ``batch_size``.

    Args:
        encoder: anything with ``tokenizer`` and ``max_seq_length`` (an :class:`Encoder`).
        texts: the strings.
        batch_size: texts per batch (the last batch may be shorter).
        sort_by_length: order by token count, longest first (ties keep the input order); else as given.
        max_length: token limit (default ``encoder.max_seq_length``).
        cache: a :class:`TokenCache` of the same tokenizer and limit, kept between calls.

    Raises:
        ValueError when ``cache`` belongs to another tokenizer or token limit.

    Example:
        >>> pool = tokenize_pool(encoder, ["a b c", "a"], batch_size=1)  # doctest: +SKIP
        >>> pool.features(0)["input_ids"].shape  # doctest: +SKIP
    """
    tok = encoder.tokenizer
    limit = int(max_length or encoder.max_seq_length)
    if cache is None:
        cache = TokenCache(tok, limit)
    elif cache.tokenizer is not tok or cache.max_length != limit:
        raise ValueError(
            f"the token cache holds another tokenizer or token limit ({cache.max_length}) than the encoder's ({limit})"
        )
    rows = cache.rows(list(texts))
    lengths = np.fromiter((len(r) for r in rows["input_ids"]), dtype=np.int64, count=len(texts))
    flat = {name: np.concatenate(r) if r else np.zeros(0, np.int32) for name, r in rows.items()}
    order = torch.argsort(torch.from_numpy(lengths), descending=True, stable=True)
    chunks = list((order if sort_by_length else torch.arange(len(texts))).split(batch_size))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    return TokenizedPool(flat, lengths, chunks, pad_id, getattr(tok, "padding_side", "right"))
