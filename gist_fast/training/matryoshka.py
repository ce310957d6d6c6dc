"""Matryoshka sizes in training: checked against the student before a run, recorded in the saved model.

A model trained with ``--matryoshka-dims 768,256,64`` is usable at each of those sizes: keep the
first m features of an embedding and compare with cosine (sentence-transformers:
``SentenceTransformer(path, truncate_dim=m)``). The trainer records the sizes in the saved model's
``config_sentence_transformers.json`` under ``"matryoshka_dims"`` (a key sentence-transformers
ignores; it does not set ``truncate_dim``, so the model still loads at full size by default), and
``gist-fast eval`` reports metrics per recorded size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ST_CONFIG = "config_sentence_transformers.json"
KEY = "matryoshka_dims"


def embedding_dim(model: Any) -> int | None:
    """The embedding size of a model given as an :class:`~gist_fast.training.encoders.Encoder`, a
    ``SentenceTransformer``, a transformers config (a dict or an object with ``hidden_size``), a
    model carrying one or a ``(model, tokenizer)`` pair; None when it cannot be told."""
    if isinstance(model, tuple) and model:  # a (model, tokenizer) pair
        model = model[0]
    dim = getattr(model, "dim", None)
    if isinstance(dim, int) and not isinstance(dim, bool):
        return dim
    if hasattr(model, "get_sentence_embedding_dimension"):
        return model.get_sentence_embedding_dimension()
    config = getattr(model, "config", model)
    size = config.get("hidden_size") if isinstance(config, dict) else getattr(config, "hidden_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def check_dims_fit(dims: Sequence[int] | None, dim: int | None, label: str, model: str) -> None:
    """Raise ValueError naming ``label`` (the option) when a size exceeds the embedding size ``dim``
    of ``model`` (named in the message); nothing when ``dims`` or ``dim`` is None.

    Example:
        >>> check_dims_fit([32, 16], 32, "--matryoshka-dims", "the student")
        >>> check_dims_fit([64, 16], 32, "--matryoshka-dims", "the student")
        Traceback (most recent call last):
        ...
        ValueError: --matryoshka-dims: every size must be at most 32, the embedding dim of the student; got 64
    """
    if dims is None or dim is None:
        return
    too_big = [m for m in dims if m > dim]
    if too_big:
        raise ValueError(
            f"{label}: every size must be at most {dim}, the embedding dim of {model}; got "
            + ", ".join(str(m) for m in too_big)
        )


def record_dims(model_dir: str | os.PathLike, dims: Sequence[int]) -> None:
    """Add ``"matryoshka_dims": [...]`` to ``model_dir``'s ``config_sentence_transformers.json``
    (created when missing)."""
    path = Path(model_dir) / ST_CONFIG
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config[KEY] = [int(m) for m in dims]
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def recorded_dims(model_dir: str | os.PathLike) -> list[int] | None:
    """The Matryoshka sizes a saved model records (see :func:`record_dims`); None when it records
    none or ``model_dir`` is not a local directory.

    Raises:
        ValueError naming the file when the recorded value is not a list of positive integers.
    """
    path = Path(model_dir) / ST_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    dims = config.get(KEY) if isinstance(config, dict) else None
    if dims is None:
        return None
    if not (
        isinstance(dims, list)
        and dims
        and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in dims)
        and len(set(dims)) == len(dims)
    ):
        raise ValueError(f"{path}: {KEY!r} must be a list of distinct positive integers; got {dims!r}")
    return dims


class RecordingDims:
    """Wraps a model whose ``save(path)`` writes the sentence-transformers layout, so that the saved
    directory also records ``dims`` (used by the trainer for the final model, before its checksums).

    Example:
        >>> save_final_model(RecordingDims(student, [32, 16]), output)  # doctest: +SKIP
    """

    def __init__(self, model: Any, dims: Sequence[int]) -> None:
        self.model = model
        self.dims = list(dims)

    def save(self, path: str | os.PathLike) -> None:
        self.model.save(path)
        record_dims(path, self.dims)
