"""The guide's embeddings of every training text, computed once and kept on disk.

The guide is frozen, so a training step never needs to run it: :func:`load_or_compute_guide`
embeds each distinct text of the data once (no grad, batched, bf16 on GPU), writes the table under a
key made of the guide's identity, the token limit, the compute dtype and the data's fingerprint, and
later runs with the same key read it back. Work is written in shards as it goes (each shard
atomically), so an interrupted computation resumes where it stopped. Each file stores the SHA-256 of
its embeddings; a file that does not match (or holds NaN / Inf) is recomputed with a warning naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .data import PairData
from .encoders import Encoder
from .files import CorruptFileError, atomic_write_bytes, make_directory, remove_stale_temporaries

log = logging.getLogger("gist_fast.training")

SHARD_TEXTS = 8192


@dataclass
class GuideTable:
    """Guide embeddings of a :class:`PairData`.

    Attributes:
        table: (u, dg) embeddings of the data's distinct texts (``PairData.unique_texts`` order).
        column_rows: one (n,) int64 tensor per data column (anchor, positive, negatives...): row
            ``i`` of column ``m`` is ``table[column_rows[m][i]]``.
        key: the cache key it was stored under.
    """

    table: Tensor
    column_rows: list[Tensor]
    key: str

    def batch(self, rows: Tensor | list[int], device: torch.device | str = "cpu") -> list[Tensor]:
        """Guide embeddings of data rows ``rows``, one (len(rows), dg) tensor per column.

        For a CUDA ``device`` the rows are gathered into pinned host memory and copied without
        blocking the host.
        """
        rows = torch.as_tensor(rows, dtype=torch.long)
        device = torch.device(device)
        pin = device.type == "cuda" and self.table.device.type == "cpu"
        out = []
        for col in self.column_rows:
            picked = col[rows]
            if pin:
                host = torch.empty((len(picked), self.table.shape[1]), dtype=self.table.dtype, pin_memory=True)
                out.append(torch.index_select(self.table, 0, picked, out=host).to(device, non_blocking=True))
            else:
                out.append(self.table[picked].to(device))
        return out


def cache_key(guide: Encoder, data: PairData, max_length: int, dtype: torch.dtype | None) -> str:
    """The cache key: changes when the guide, its token limit, the compute dtype or the data change."""
    parts = {"guide": guide.identity(), "max_length": int(max_length), "dtype": str(dtype), "data": data.fingerprint()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename over ``path``.

    Raises:
        WriteError naming ``path`` (disk full, read-only directory); no temporary is left.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def tensor_checksum(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (stored with each cache file, checked on read)."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_checked(path: Path, rows: int, key: str | None) -> Tensor:
    """The embeddings in cache file ``path``; raises CorruptFileError naming it when they are not
    exactly what was written (checksum), have the wrong rows or key, or hold NaN / Inf."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    except Exception as e:  # noqa: BLE001 - any failure to parse is a damaged file
        raise CorruptFileError(path, f"unreadable ({type(e).__name__})") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("table"), Tensor):
        raise CorruptFileError(path, "not a gist-fast guide cache file")
    table = stored["table"]
    if stored.get("sha256") != tensor_checksum(table):
        raise CorruptFileError(path, "checksum mismatch (the file is corrupted or was changed)")
    if key is not None and stored.get("key") != key:
        raise CorruptFileError(path, f"stored under key {stored.get('key')!r}, not {key!r}")
    if table.ndim != 2 or table.shape[0] != rows:
        raise CorruptFileError(path, f"{tuple(table.shape)} embeddings, expected {rows} rows")
    if not torch.isfinite(table).all():
        raise CorruptFileError(path, "contains NaN or Inf")
    return table


def load_or_compute_guide(
    guide: Encoder,
    data: PairData,
    cache_dir: str | os.PathLike,
    *,
    max_length: int | None = None,
    batch_size: int = 128,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> GuideTable:
    """Return the guide's embeddings of every text in ``data``, from the cache when the key matches.

    Args:
        guide: the frozen guide encoder (on the device to compute on).
        data: the training pairs.
        cache_dir: directory of cache files (``guide-<key>.pt``).
        max_length: the guide's token limit (default ``guide.max_seq_length``).
        batch_size: texts per guide forward pass.
        dtype: autocast dtype (``torch.bfloat16`` on CUDA); None computes in the weights' dtype.
            The table is stored in float32, or bfloat16 when computed in bfloat16.
        progress: show a tqdm bar.

    Returns:
        A :class:`GuideTable`.

    Example:
        >>> table = load_or_compute_guide(guide, data, "runs/cache")  # doctest: +SKIP
        >>> ga, gp = table.batch([0, 1, 2])  # doctest: +SKIP
    """
    max_length = int(max_length or guide.max_seq_length)
    cache_dir = Path(cache_dir)
    key = cache_key(guide, data, max_length, dtype)
    final = cache_dir / f"guide-{key}.pt"
    texts = data.unique_texts()
    position = {t: i for i, t in enumerate(texts)}
    column_rows = [torch.tensor([position[t] for t in col], dtype=torch.long) for col in data.columns()]
    make_directory(cache_dir)
    remove_stale_temporaries(cache_dir)  # left by a killed run (only ours, only of dead processes)
    if final.exists():
        try:
            return GuideTable(_read_checked(final, len(texts), key), column_rows, key)
        except CorruptFileError as e:
            log.warning("guide cache %s is damaged (%s); recomputing it", final, e)
    shard_dir = make_directory(cache_dir / f"guide-{key}.shards")
    remove_stale_temporaries(shard_dir)
    store_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    parts: list[Tensor] = []
    from tqdm.auto import tqdm

    with tqdm(total=len(texts), desc="guide cache", unit="text", disable=not progress) as bar:
        for j, start in enumerate(range(0, len(texts), SHARD_TEXTS)):
            chunk = texts[start : start + SHARD_TEXTS]
            shard = shard_dir / f"shard-{j:06d}.pt"
            emb = None
            if shard.exists():
                try:
                    emb = _read_checked(shard, len(chunk), key)
                except CorruptFileError as e:
                    log.warning("guide cache shard %s is damaged (%s); recomputing it", shard, e)
            if emb is None:
                # the whole shard in one call: sorted by token length across it, one copy back to the host
                emb = guide.encode(chunk, batch_size=batch_size, max_length=max_length, dtype=dtype).to(store_dtype)
                bar.update(len(chunk))
                bad = (~torch.isfinite(emb).all(dim=1)).nonzero().flatten()
                if len(bad):
                    raise ValueError(
                        f"the guide {guide.name or type(guide.model).__name__} gave NaN or Inf embeddings for "
                        f"{len(bad)} text(s), the first: {chunk[int(bad[0])][:80]!r}"
                    )
                atomic_torch_save({"key": key, "table": emb, "sha256": tensor_checksum(emb)}, shard)
            else:
                bar.update(len(chunk))
            parts.append(emb)
    table = torch.cat(parts) if parts else torch.empty(0, guide.dim, dtype=store_dtype)
    atomic_torch_save({"key": key, "table": table, "max_length": max_length, "sha256": tensor_checksum(table)}, final)
    shutil.rmtree(shard_dir, ignore_errors=True)
    return GuideTable(table, column_rows, key)
