"""Training pairs through ``datasets``: loading, validation, and the duplicate-free batch schedule."""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .extras import require

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


@dataclass
class PairData:
    """Validated text columns: ``anchors[i]``, ``positives[i]`` and ``negatives[m][i]`` form row ``i``.

    Attributes:
        anchors, positives: n strings each.
        negatives: k lists of n strings (k >= 0 hard-negative columns).
        source: where the rows came from (for messages).
    """

    anchors: list[str]
    positives: list[str]
    negatives: list[list[str]]
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(self.anchors)

    def columns(self) -> list[list[str]]:
        """[anchors, positives, negatives_1, ..., negatives_k]."""
        return [self.anchors, self.positives, *self.negatives]

    def unique_texts(self) -> list[str]:
        """Every distinct text of every column, in order of first appearance."""
        return list(dict.fromkeys(t for col in self.columns() for t in col))

    def fingerprint(self) -> str:
        """A hash of the content (every column, in order): equal data give equal fingerprints."""
        h = hashlib.sha256()
        for col in self.columns():
            h.update(b"\x00col\x00")
            for t in col:
                h.update(t.encode("utf-8", "surrogatepass"))
                h.update(b"\x00")
        return h.hexdigest()[:32]

    def subset(self, idx: Sequence[int]) -> PairData:
        """The rows ``idx`` as a new :class:`PairData`."""
        return PairData(
            [self.anchors[i] for i in idx],
            [self.positives[i] for i in idx],
            [[col[i] for i in idx] for col in self.negatives],
            self.source,
        )


def _load_dataset(source: str, split: str):
    datasets = require("datasets", f"reading the data {source}")

    path = Path(source)
    if path.is_file():
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"{source}: unknown data format {path.suffix!r}; use one of {sorted(_FORMATS)}")
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    if path.exists() or source.startswith((".", "/", "~")) or path.suffix.lower() in _FORMATS:
        raise FileNotFoundError(f"data file {source} does not exist")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - rewrap with the id and the offline hint
        raise FileNotFoundError(
            f"could not load dataset {source!r} (split {split!r}) from the Hugging Face hub: {type(e).__name__}: {e}"
        ) from e


def load_pairs(
    source: Any,
    *,
    anchor_column: str = "anchor",
    positive_column: str = "positive",
    negative_columns: Sequence[str] | None = None,
    split: str = "train",
    limit: int | None = None,
) -> PairData:
    """Load and validate (anchor, positive, negatives...) rows.

    Args:
        source: a local ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` file, a hub dataset id, a
            ``datasets.Dataset``, a dict of columns or a list of row dicts.
        anchor_column, positive_column: column names of the anchors and positives.
        negative_columns: hard-negative columns; None takes every column whose name starts with
            ``"negative"`` (in file order), ``[]`` takes none.
        split: split of a hub dataset.
        limit: keep only the first ``limit`` rows.

    Returns:
        A :class:`PairData`.

    Raises:
        ValueError naming the file, the row (0-based) and the column for a missing column, a missing
        value, a non-string or an empty text.

    Example:
        >>> data = load_pairs({"anchor": ["q1", "q2"], "positive": ["d1", "d2"]})
        >>> len(data), data.negatives
        (2, [])
    """
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        ds = _load_dataset(name, split)
        column_names = list(ds.column_names)
        get = ds.__getitem__
        n = len(ds)
    elif isinstance(source, Mapping):
        name = "<dict>"
        column_names = list(source)
        lengths = {len(v) for v in source.values()}
        if len(lengths) > 1:
            raise ValueError(f"{name}: columns have different lengths {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        get = source.__getitem__
    elif isinstance(source, Sequence):
        name = "<list>"
        column_names = list(dict.fromkeys(k for row in source for k in row))
        n = len(source)

        def get(col):
            return [row.get(col) for row in source]
    else:  # a datasets.Dataset or anything with column_names
        name = getattr(source, "info", None) and getattr(source.info, "dataset_name", None) or "<dataset>"
        column_names = list(source.column_names)
        get = source.__getitem__
        n = len(source)
    if negative_columns is None:
        negative_columns = [c for c in column_names if c.startswith("negative")]
    wanted = [anchor_column, positive_column, *negative_columns]
    for col in wanted:
        if col not in column_names:
            raise ValueError(
                f"{name}: column {col!r} is missing; the data has columns {column_names} "
                "(set the column names with --anchor-column / --positive-column / --negative-columns)"
            )
    if n == 0:
        raise ValueError(f"{name}: no rows")
    rows = n if limit is None else min(n, int(limit))
    cols = []
    for col in wanted:
        values = list(get(col))[:rows]
        for i, v in enumerate(values):
            if v is None:
                raise ValueError(f"{name}: row {i} (0-based): column {col!r} is missing (null)")
            if not isinstance(v, str):
                raise ValueError(
                    f"{name}: row {i} (0-based): column {col!r} is a {type(v).__name__}, not a string: {v!r}"
                )
            if not v.strip():
                raise ValueError(f"{name}: row {i} (0-based): column {col!r} is an empty text")
        cols.append(values)
    return PairData(cols[0], cols[1], cols[2:], name)


class NoDuplicatesBatches:
    """Seeded, duplicate-free batches: no text appears twice in a batch (across all columns).

    Each epoch is a seeded permutation (``seed``, ``epoch``) filled greedily into batches of
    ``batch_size`` rows; a row sharing a text with the batch being filled is deferred to the next
    batch (like sentence-transformers' ``NO_DUPLICATES`` sampler). The batches of an epoch are a pure
    function of (data, batch size, seed, epoch), so a resumed run sees the same order.

    Args:
        data: the training pairs.
        batch_size: rows per contrastive batch.
        seed: shuffling seed.
        drop_last: drop an epoch's last batch when it is smaller than ``batch_size``.

    Example:
        >>> data = load_pairs({"anchor": ["a", "b", "a"], "positive": ["x", "y", "z"]})
        >>> NoDuplicatesBatches(data, 2, seed=0).epoch(0)  # "a" never twice in a batch
        [[2, 1], [0]]
    """

    def __init__(self, data: PairData, batch_size: int, *, seed: int = 0, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.n = len(data)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        ids: dict[str, int] = {}
        self.row_texts = [
            frozenset(ids.setdefault(t, len(ids)) for t in row) for row in zip(*data.columns(), strict=True)
        ]
        self._cache: dict[int, list[list[int]]] = {}

    def epoch(self, epoch: int) -> list[list[int]]:
        """The batches (lists of row indices) of ``epoch``."""
        if epoch in self._cache:
            return self._cache[epoch]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        pending = deque(torch.randperm(self.n, generator=g).tolist())
        batches: list[list[int]] = []
        while pending:
            batch: list[int] = []
            seen: set[int] = set()
            deferred: list[int] = []
            while pending and len(batch) < self.batch_size:
                i = pending.popleft()
                if seen.isdisjoint(self.row_texts[i]):
                    batch.append(i)
                    seen.update(self.row_texts[i])
                else:
                    deferred.append(i)
            pending.extendleft(reversed(deferred))
            batches.append(batch)
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if len(self._cache) > 4:
            self._cache.clear()
        self._cache[epoch] = batches
        return batches


@dataclass
class StepPosition:
    """Where a step sits in the schedule: global ``step`` (0-based), ``epoch``, and ``batch`` in the epoch."""

    step: int
    epoch: int
    batch: int


class BatchSchedule:
    """The sequence of training batches for a number of epochs or a step budget.

    Args:
        batches: the per-epoch batch generator.
        epochs: number of epochs (used when ``max_steps`` is None).
        max_steps: a step budget; runs through as many epochs as needed.

    Iterating :meth:`iterate` from a step yields ``(StepPosition, row_indices)`` exactly as an
    uninterrupted run would from that step on.
    """

    def __init__(self, batches: NoDuplicatesBatches, *, epochs: float | None = None, max_steps: int | None = None):
        if max_steps is None and epochs is None:
            raise ValueError("give either epochs or max_steps")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1; got {max_steps}")
        if max_steps is None and epochs <= 0:
            raise ValueError(f"epochs must be > 0; got {epochs}")
        self.batches = batches
        if max_steps is not None:
            self.total_steps = int(max_steps)
        else:
            whole, frac = int(epochs), epochs - int(epochs)
            total = sum(len(batches.epoch(e)) for e in range(whole))
            if frac > 0:
                total += max(1, round(frac * len(batches.epoch(whole))))
            self.total_steps = total
        if self.total_steps < 1 or len(batches.epoch(0)) == 0:
            raise ValueError("the schedule has no steps (empty data after drop_last?)")

    def iterate(self, start_step: int = 0) -> Iterator[tuple[StepPosition, list[int]]]:
        """Yield ``(position, row_indices)`` for steps ``start_step .. total_steps - 1``."""
        step, epoch = 0, 0
        while step < self.total_steps:
            batches = self.batches.epoch(epoch)
            if step + len(batches) <= start_step:
                step += len(batches)
                epoch += 1
                continue
            for b, rows in enumerate(batches):
                if step >= self.total_steps:
                    return
                if step >= start_step:
                    yield StepPosition(step, epoch, b), rows
                step += 1
            epoch += 1
