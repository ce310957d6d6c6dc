"""Training pairs through ``datasets``: loading, validation, and the duplicate-free batch schedule."""

from __future__ import annotations

import hashlib
import json
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
    """A local file as ``(column names, rows as dicts)`` or a ``datasets.Dataset`` (parquet, hub id)."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in _FORMATS:
            raise ValueError(f"{source}: unknown data format {path.suffix!r}; use one of {sorted(_FORMATS)}")
        if suffix in (".jsonl", ".json"):
            return read_json_rows(path)
        if suffix in (".csv", ".tsv"):
            return read_csv_rows(path, delimiter="\t" if suffix == ".tsv" else ",")
        datasets = require("datasets", f"reading the data {source}")
        try:
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 - one line naming the file instead of a library traceback
            raise ValueError(f"{source}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if path.exists():
        raise ValueError(f"data path {source} is not a file")
    if source.startswith((".", "/", "~")) or path.suffix.lower() in _FORMATS:
        raise FileNotFoundError(f"data file {source} does not exist")
    datasets = require("datasets", f"reading the data {source}")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - rewrap with the id and the offline hint
        raise FileNotFoundError(
            f"could not load dataset {source!r} (split {split!r}) from the Hugging Face hub: {type(e).__name__}: {e}"
        ) from e


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark dropped); ValueError naming the file, line and
    byte of the first invalid byte (e.g. a Latin-1 file)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "save the file as UTF-8"
        ) from None


def read_json_rows(path: str | os.PathLike) -> tuple[list[str], list[dict]]:
    """Rows of a JSON-lines file (one object per line; blank lines skipped), or of a ``.json`` file
    holding a list of objects (or one object).

    Returns:
        ``(column names in order of first appearance, rows)``.

    Raises:
        ValueError naming the file and line: invalid UTF-8 or JSON, a line that is not an object, no rows.

    Example:
        >>> read_json_rows("pairs.jsonl")  # doctest: +SKIP
        (['anchor', 'positive'], [{'anchor': 'q', 'positive': 'd'}])
    """
    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise ValueError(f"{path}: the file is empty (no rows)")
    rows: list[Any] | None = None
    if path.suffix.lower() == ".json":  # a whole-file JSON list (or one object), else JSON lines
        try:
            whole = json.loads(text)
            rows = whole if isinstance(whole, list) else [whole]
        except json.JSONDecodeError:
            rows = None
    if rows is not None:
        numbered = [(i, f"item {i} (0-based)") for i in range(len(rows))]
    else:
        rows, numbered = [], []  # JSON lines
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}: line {number}: not valid JSON ({e.msg}, column {e.colno}); a .jsonl file holds "
                    "one JSON object per line"
                ) from None
            numbered.append((len(rows) - 1, f"line {number}"))
    for i, where in numbered:
        if not isinstance(rows[i], dict):
            raise ValueError(f"{path}: {where}: expected an object of columns, got {type(rows[i]).__name__}")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return list(dict.fromkeys(k for row in rows for k in row)), rows


def read_csv_rows(path: str | os.PathLike, *, delimiter: str = ",") -> tuple[list[str], list[dict]]:
    """Rows of a CSV (or TSV) file with a header line; every value is the text as written.

    Raises:
        ValueError naming the file (and line): invalid UTF-8, no header, a header but no rows, a row
        with more or fewer fields than the header, a repeated column name.
    """
    import csv
    import io

    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise ValueError(f"{path}: the file is empty (no header line, no rows)")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
        duplicated = [c for c in dict.fromkeys(header) if header.count(c) > 1]
        if duplicated:
            raise ValueError(f"{path}: line 1: column {duplicated[0]!r} appears twice in the header")
        rows = []
        for fields in reader:
            if not fields:
                continue  # a blank line
            if len(fields) != len(header):
                raise ValueError(
                    f"{path}: line {reader.line_num}: {len(fields)} fields, but the header has {len(header)}"
                )
            rows.append(dict(zip(header, fields, strict=True)))
    except csv.Error as e:
        raise ValueError(f"{path}: line {reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        raise ValueError(f"{path}: no rows (only the header line {delimiter.join(header)!r})")
    return header, rows


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
        value, a non-string, an empty text or a lone surrogate; naming the file (and line) for an
        empty file, a header-only CSV, bytes that are not UTF-8, or a line that is not JSON.

    Example:
        >>> data = load_pairs({"anchor": ["q1", "q2"], "positive": ["d1", "d2"]})
        >>> len(data), data.negatives
        (2, [])
    """
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        loaded = _load_dataset(name, split)
        if isinstance(loaded, tuple):  # a local JSON or CSV file, read here
            column_names, file_rows = loaded
            n = len(file_rows)

            def get(col):
                return [row.get(col) for row in file_rows]
        else:
            column_names = list(loaded.column_names)
            get = loaded.__getitem__
            n = len(loaded)
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
            if not v.isascii():
                _check_encodable(v, f"{name}: row {i} (0-based): column {col!r}")
        cols.append(values)
    return PairData(cols[0], cols[1], cols[2:], name)


def _check_encodable(text: str, where: str) -> None:
    """ValueError naming ``where`` when ``text`` holds a lone surrogate (e.g. a JSON ``"\\ud800"``
    escape): it is not Unicode text, and tokenizers cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{where} has a lone surrogate {text[e.start]!r} at character {e.start}: not valid Unicode text"
        ) from None


class NoDuplicatesBatches:
    """Seeded, duplicate-free batches of at least ``min_rows`` rows: no text appears twice in a batch
    (across all columns).

    Each epoch is a seeded permutation (``seed``, ``epoch``) filled greedily into batches of
    ``batch_size`` rows; a row sharing a text with the batch being filled is deferred to the next
    batch (like sentence-transformers' ``NO_DUPLICATES`` sampler). A batch left with fewer than
    ``min_rows`` rows (an epoch's tail, or rows that share a text with every other row left) would
    be a degenerate step (one row: the loss is 0), so each of its rows joins the latest batch of
    the epoch that shares no text with it (that batch then holds more than ``batch_size`` rows);
    a row that fits in no batch is left out of the epoch (:meth:`left_out` lists them). The batches
    of an epoch are a pure function of (data, batch size, min rows, seed, epoch), so a resumed run
    sees the same order.

    Args:
        data: the training pairs.
        batch_size: rows per contrastive batch (>= ``min_rows``).
        seed: shuffling seed.
        drop_last: drop an epoch's last batch when it is smaller than ``batch_size``.
        min_rows: the fewest rows a batch may have (>= 2; the trainer passes the number of
            processes when that is larger, so that every process gets a row).

    Example:
        >>> data = load_pairs({"anchor": ["a", "b", "c", "d", "e"], "positive": ["v", "w", "x", "y", "z"]})
        >>> NoDuplicatesBatches(data, 2, seed=0).epoch(0)  # the 1-row tail [2] joins the batch before
        [[4, 0], [1, 3, 2]]
    """

    def __init__(
        self, data: PairData, batch_size: int, *, seed: int = 0, drop_last: bool = False, min_rows: int = 2
    ) -> None:
        if min_rows < 2:
            raise ValueError(f"min_rows must be >= 2 (a batch of one row has nothing to contrast); got {min_rows}")
        if batch_size < min_rows:
            raise ValueError(f"batch_size must be >= {min_rows}; got {batch_size}")
        self.n = len(data)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.min_rows = min_rows
        ids: dict[str, int] = {}
        self.row_texts = [
            frozenset(ids.setdefault(t, len(ids)) for t in row) for row in zip(*data.columns(), strict=True)
        ]
        self._cache: dict[int, tuple[list[list[int]], list[int]]] = {}

    def epoch(self, epoch: int) -> list[list[int]]:
        """The batches (lists of row indices) of ``epoch``; every batch has at least ``min_rows`` rows."""
        return self._epoch(epoch)[0]

    def left_out(self, epoch: int) -> list[int]:
        """The rows of ``epoch`` that share a text with every batch, so are in none."""
        return self._epoch(epoch)[1]

    def _epoch(self, epoch: int) -> tuple[list[list[int]], list[int]]:
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
        batches, left_out = self._merge_short(batches)
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if len(self._cache) > 4:
            self._cache.clear()
        self._cache[epoch] = (batches, left_out)
        return batches, left_out

    def _merge_short(self, batches: list[list[int]]) -> tuple[list[list[int]], list[int]]:
        """Move the rows of batches shorter than ``min_rows`` into the latest batch that shares no text
        with them; returns the batches and the rows that fit nowhere."""
        kept = [b for b in batches if len(b) >= self.min_rows]
        short = [i for b in batches if len(b) < self.min_rows for i in b]
        if not short:
            return batches, []
        holding: dict[int, set[int]] = {}  # text id -> the kept batches that hold it
        for k, b in enumerate(kept):
            for i in b:
                for t in self.row_texts[i]:
                    holding.setdefault(t, set()).add(k)
        left_out = []
        for i in short:
            blocked = set().union(*(holding.get(t, ()) for t in self.row_texts[i]))
            k = len(kept) - 1
            while k >= 0 and k in blocked:
                k -= 1
            if k < 0:
                left_out.append(i)
                continue
            kept[k].append(i)
            for t in self.row_texts[i]:
                holding.setdefault(t, set()).add(k)
        return kept, left_out


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
