"""Checks a training run makes before it writes anything: models' token limits, the loss backend, the data.

A run that fails one of these stops with a one-line error naming the option or the file, and leaves
no output directory, default student, guide cache or lock behind (the trainer calls them first).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from .data import NoDuplicatesBatches, PairData

# Models whose position ids start after the padding index: usable positions = max_position_embeddings
# - (pad_token_id + 1) (e.g. RoBERTa: 514 - 2 = 512).
_PADDING_OFFSET_MODELS = {
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "mpnet", "data2vec-text", "xmod",
    "roberta-prelayernorm", "ibert", "markuplm", "luke", "mluke",
}  # fmt: skip


def position_limit(config: Any) -> int | None:
    """The most tokens a model with this ``config`` (a dict or a transformers config) can embed,
    from ``max_position_embeddings``; None when the config does not say (rotary or relative positions).

    Example:
        >>> position_limit({"model_type": "bert", "max_position_embeddings": 512})
        512
        >>> position_limit({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1})
        512
    """
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    limit = get("max_position_embeddings")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        return None
    if get("model_type") in _PADDING_OFFSET_MODELS:
        pad = get("pad_token_id")
        limit -= (pad if isinstance(pad, int) else 1) + 1
    return limit


def model_config(source: Any, label: str) -> Any:
    """The transformers config of a model given as a directory, a hub id or an in-memory encoder,
    read without loading its weights; None when it cannot be told (e.g. an unknown object).

    Raises:
        FileNotFoundError naming ``label`` (the option) for a local path that does not exist or has
        no ``config.json``, or a hub id whose config cannot be fetched.
    """
    if not isinstance(source, (str, Path)):
        model = getattr(source, "model", source)  # an Encoder, a (model, tokenizer) pair's model, ...
        if isinstance(source, tuple) and source:
            model = source[0]
        return getattr(model, "config", None)
    root = Path(source)
    text = str(source)
    if root.is_dir():
        model_dir = root
        if (root / "modules.json").is_file():
            for module in _read_json(root / "modules.json", label):
                if isinstance(module, dict) and str(module.get("type", "")).endswith("Transformer"):
                    model_dir = root / module.get("path", "")
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{label}: {model_dir} has no config.json: not a transformers model directory")
        return _read_json(model_dir / "config.json", label)
    if root.exists():
        raise FileNotFoundError(f"{label}: model path {text} is not a directory")
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"{label}: model directory {text} does not exist")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(text)
    except Exception as e:  # noqa: BLE001 - one line naming the option and the id
        raise FileNotFoundError(
            f"{label}: could not fetch the config of model {text!r} from the Hugging Face hub "
            f"({type(e).__name__}); pass a local directory, or unset HF_HUB_OFFLINE if you meant to download it"
        ) from None


def _read_json(path: Path, label: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{label}: cannot read {path} ({type(e).__name__}: {e})") from None


def check_seq_length(source: Any, source_label: str, max_seq_length: int | None, label: str) -> None:
    """Raise ValueError naming ``label`` when ``max_seq_length`` exceeds the model's position limit
    (a longer input would fail inside the model, after the run has started)."""
    config = model_config(source, source_label)
    if max_seq_length is None or config is None:
        return
    limit = position_limit(config)
    if limit is not None and max_seq_length > limit:
        raise ValueError(
            f"{label}: must be at most {limit}, the position limit of the model {source}; got {max_seq_length}"
        )


def check_backend(name: str, label: str) -> None:
    """Raise ValueError naming ``label`` for an unknown backend, or a Triton one without Triton."""
    from ..backends import BACKENDS

    if name not in BACKENDS:
        raise ValueError(f"{label}: must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name.startswith("triton") and importlib.util.find_spec("triton") is None:
        raise ValueError(f"{label}: {name} needs the package triton (pip install triton); or use torch")


def check_trainable(data: PairData, sampler: NoDuplicatesBatches, label: str) -> list[str]:
    """Refuse data that cannot train; return warnings for data that trains only in part.

    A contrastive step needs at least two rows, and a batch never repeats a text: one row, or rows
    that all share a text (e.g. the same anchor everywhere), leave no batch to train on (the loss
    would be 0 at every step). Rows that fit in no batch of the first epoch are left out, with a
    warning.

    Raises:
        ValueError naming ``label`` (the data option) and the source.
    """
    n = len(data)
    if n < 2:
        raise ValueError(
            f"{label}: {data.source} has {n} row; a contrastive step needs at least 2 rows (nothing to learn)"
        )
    batches, left_out = sampler.epoch(0), sampler.left_out(0)
    if not batches:
        shared = _most_shared_text(data)
        raise ValueError(
            f"{label}: {data.source}: no batch of {sampler.min_rows} rows without a repeated text can be formed "
            f"(every row shares a text with every other; e.g. {shared}); a one-row step has loss 0: "
            "nothing to learn"
        )
    warnings = []
    if left_out:
        warnings.append(
            f"{data.source}: {len(left_out)} of {n} rows share a text with every batch of the epoch and are left "
            f"out of it (a batch never repeats a text); e.g. {_most_shared_text(data)}"
        )
    return warnings


def _most_shared_text(data: PairData) -> str:
    from collections import Counter

    counts: Counter[str] = Counter()
    for row in zip(*data.columns(), strict=True):
        counts.update(set(row))
    text, k = counts.most_common(1)[0]
    return f"{text[:60]!r} is in {k} of {len(data)} rows"
