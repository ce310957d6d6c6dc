"""Texts tokenized once, grouped by token length into batches, padded per batch, moved to the device.

Shared by the GradCache step (the student's mini-batches) and :meth:`Encoder.encode` (the guide
cache, evaluation): both cut length-sorted texts into batches, so a batch pads to similar lengths.
On CUDA the padded batches are written straight into pinned host memory and copied asynchronously.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


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


@dataclass
class TokenizedPool:
    """Texts tokenized once (unpadded) and grouped into length-sorted batches.

    Attributes:
        input_ids / extra: token ids (and e.g. ``token_type_ids``) of every text, unpadded.
        chunks: one int64 tensor of text indices per batch, longest texts first.
        pad_id: the tokenizer's padding id. padding_side: ``"right"`` or ``"left"``.
    """

    input_ids: list[list[int]]
    extra: dict[str, list[list[int]]]
    chunks: list[Tensor]
    pad_id: int
    padding_side: str = "right"

    def features(self, c: int, pin_memory: bool = False) -> dict[str, Tensor]:
        """Padded (n, longest) int64 features of batch ``c``, in pinned host memory if ``pin_memory``."""
        idx = self.chunks[c].tolist()
        width = max(len(self.input_ids[i]) for i in idx)

        def pad(rows: list[list[int]], value: int) -> Tensor:
            out = torch.full((len(rows), width), value, dtype=torch.int64, pin_memory=pin_memory)
            view = out.numpy()  # the same memory: filled row by row without another copy
            for r, row in enumerate(rows):
                if self.padding_side == "left":
                    view[r, width - len(row) :] = row
                else:
                    view[r, : len(row)] = row
            return out

        ids = [self.input_ids[i] for i in idx]
        feats = {"input_ids": pad(ids, self.pad_id), "attention_mask": pad([[1] * len(r) for r in ids], 0)}
        for name, rows in self.extra.items():
            feats[name] = pad([rows[i] for i in idx], 0)
        return feats


def tokenize_pool(
    encoder: Any,
    texts: list[str],
    batch_size: int,
    sort_by_length: bool = True,
    max_length: int | None = None,
) -> TokenizedPool:
    """Tokenize ``texts`` once without padding and cut them into batches of ``batch_size`` (longest first).

    Args:
        encoder: anything with ``tokenizer`` and ``max_seq_length`` (an :class:`Encoder`).
        texts: the strings.
        batch_size: texts per batch (the last batch may be shorter).
        sort_by_length: order by token count, longest first (ties keep the input order); else as given.
        max_length: token limit (default ``encoder.max_seq_length``).

    Example:
        >>> pool = tokenize_pool(encoder, ["a b c", "a"], batch_size=1)  # doctest: +SKIP
        >>> pool.features(0)["input_ids"].shape  # doctest: +SKIP
    """
    tok = encoder.tokenizer
    enc = tok(list(texts), truncation=True, max_length=max_length or encoder.max_seq_length, padding=False)
    input_ids = enc["input_ids"]
    extra = {k: enc[k] for k in ("token_type_ids",) if k in enc}
    lengths = torch.tensor([len(x) for x in input_ids], dtype=torch.long)
    order = torch.argsort(lengths, descending=True, stable=True) if sort_by_length else torch.arange(len(texts))
    chunks = list(order.split(batch_size))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    return TokenizedPool(input_ids, extra, chunks, pad_id, getattr(tok, "padding_side", "right"))
