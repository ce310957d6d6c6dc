"""The guide's embeddings of every training text, computed once and kept on disk.

The guide is frozen, so a training step never needs to run it: :func:`load_or_compute_guide`
embeds each distinct text of the data once (no grad, batched, bf16 on GPU), writes the table under a
key made of the guide's identity, the token limit, the compute dtype and the data's fingerprint, and
later runs with the same key read it back. Work is written in shards as it goes (each shard
atomically), so an interrupted computation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .data import PairData
from .encoders import Encoder

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
        """Guide embeddings of data rows ``rows``, one (len(rows), dg) tensor per column."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return [self.table[col[rows]].to(device, non_blocking=True) for col in self.column_rows]


def cache_key(guide: Encoder, data: PairData, max_length: int, dtype: torch.dtype | None) -> str:
    """The cache key: changes when the guide, its token limit, the compute dtype or the data change."""
    parts = {"guide": guide.identity(), "max_length": int(max_length), "dtype": str(dtype), "data": data.fingerprint()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    if final.exists():
        try:
            stored = torch.load(final, map_location="cpu", weights_only=True)
            if stored["key"] == key and stored["table"].shape[0] == len(texts):
                return GuideTable(stored["table"], column_rows, key)
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, not fatal
            pass
    shard_dir = cache_dir / f"guide-{key}.shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
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
                    emb = torch.load(shard, map_location="cpu", weights_only=True)
                    if emb.shape[0] != len(chunk):
                        emb = None
                except Exception:  # noqa: BLE001
                    emb = None
            if emb is None:
                emb = torch.empty(0)
                pieces = []
                for s in range(0, len(chunk), batch_size * 8):
                    sub = chunk[s : s + batch_size * 8]
                    pieces.append(guide.encode(sub, batch_size=batch_size, max_length=max_length, dtype=dtype))
                    bar.update(len(sub))
                emb = torch.cat(pieces).to(store_dtype)
                atomic_torch_save(emb, shard)
            else:
                bar.update(len(chunk))
            parts.append(emb)
    table = torch.cat(parts) if parts else torch.empty(0, guide.dim, dtype=store_dtype)
    atomic_torch_save({"key": key, "table": table, "max_length": max_length}, final)
    shutil.rmtree(shard_dir, ignore_errors=True)
    return GuideTable(table, column_rows, key)
