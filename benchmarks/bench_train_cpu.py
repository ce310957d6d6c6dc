"""Training throughput: ``gist-fast train`` against sentence-transformers' trainer with CachedGISTEmbedLoss.

Both sides train the same student (the first two layers of all-MiniLM-L6-v2, the default run's)
with the same guide (all-MiniLM-L6-v2), on the same rows (standard-library docstring pairs; rows
are repeated with a numeric suffix when the configuration needs more than exist), with the same
contrastive batch, mini-batch, token limit, learning-rate schedule, loss options and threads:

- gist-fast: :class:`gist_fast.training.Trainer` (GradCache step, guide embeddings from the disk
  cache). The guide cache is filled first and timed on its own; it is paid once per data set and
  guide, not per epoch.
- sentence-transformers: ``SentenceTransformerTrainer`` with ``CachedGISTEmbedLoss`` and the
  ``NO_DUPLICATES`` batch sampler, which runs the guide on every batch.

Each side runs in its own subprocess. Reported per side: the time of each optimizer step, samples/s
over the measured steps (the first ``--warmup`` steps excluded), the process's peak resident memory
(VmHWM, models included) and, on CUDA, ``torch.cuda.max_memory_allocated``. For gist-fast also the
guide-cache time and the samples/s of a first epoch over the benchmark rows with the cache counted
in.

Configurations:
    (default) CPU: batch 1024, mini-batch 64, 64 tokens, 2 steps.
    --cuda       : batch 65536, mini-batch 512, 64 tokens, 3 steps (1 warm-up), bf16 autocast on both
                   sides (for a machine with a GPU; not run in CI).

Usage:
    .venv/bin/python benchmarks/bench_train_cpu.py [--steps 2] [--threads N] [--only gist-fast]
    .venv/bin/python benchmarks/bench_train_cpu.py --cuda --only gist-fast --timeout 540
    .venv/bin/python benchmarks/bench_train_cpu.py --cuda --only sentence-transformers --timeout 540

With ``--only``, a side measured earlier with the same configuration is kept in the report, so the
two sides can run as separate commands (useful where one command may run only ~10 minutes). A side
that fails (out of memory, timeout) is recorded with its error.

Writes ``train_cpu.json`` / ``train_cpu.md`` (``train_cuda.*`` with --cuda) under --out
(default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

CONFIGS = {
    "cpu": {"batch": 1024, "mini": 64, "max_len": 64, "steps": 2, "warmup": 0, "device": "cpu"},
    "cuda": {"batch": 65536, "mini": 512, "max_len": 64, "steps": 3, "warmup": 1, "device": "cuda"},
}
LR = 1e-4
TEMPERATURE = 0.01
SIDES = ("gist-fast", "sentence-transformers")


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_rows(n: int, workdir: Path) -> Path:
    """``n`` (anchor, positive) rows as jsonl: docstring pairs, repeated with a suffix if needed."""
    from gist_fast.training.stdlib_data import stdlib_docstring_pairs

    pairs = stdlib_docstring_pairs()
    path = workdir / f"rows-{n}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            a, p = pairs[i % len(pairs)]
            k = i // len(pairs)
            suffix = f" ({k})" if k else ""
            f.write(json.dumps({"anchor": a + suffix, "positive": p + suffix}) + "\n")
    return path


def models(workdir: Path) -> tuple[str, str]:
    from gist_fast.training.defaults import default_guide_path, make_default_student

    guide = default_guide_path()
    return make_default_student(guide, workdir / "student"), guide


# ------------------------------------------------------------------------------------------- sides
def run_gist_fast(cfg: dict, data: str, student: str, guide: str, workdir: Path) -> dict:
    import torch

    from gist_fast.training import TrainConfig, Trainer, load_encoder, load_or_compute_guide, load_pairs

    device = torch.device(cfg["device"])
    bf16 = torch.bfloat16 if device.type == "cuda" else None
    pairs = load_pairs(data)
    g = load_encoder(guide, max_seq_length=cfg["max_len"], device=device).eval().requires_grad_(False)
    cache = workdir / "cache"
    t = time.perf_counter()
    load_or_compute_guide(g, pairs, cache, batch_size=256 if device.type == "cuda" else 64, dtype=bf16, progress=False)
    cache_s = time.perf_counter() - t
    del g
    total = cfg["steps"] + cfg["warmup"]
    config = TrainConfig(
        student=student,
        guide=guide,
        data=data,
        output=str(workdir / "gist-fast-out"),
        overwrite=True,  # scratch: a rerun with the same --workdir replaces the last run
        batch_size=cfg["batch"],
        mini_batch_size=cfg["mini"],
        max_steps=total,
        lr=LR,
        max_seq_length=cfg["max_len"],
        guide_max_seq_length=cfg["max_len"],
        temperature=TEMPERATURE,
        device=cfg["device"],
        save_steps=0,
        cache_dir=str(cache),
        progress=False,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    Trainer(config).train()
    log = [json.loads(line) for line in (workdir / "gist-fast-out" / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["step_s"] for r in log if "step_s" in r]
    out = {"step_s": step_s, "cache_s": cache_s, "losses": [r["loss"] for r in log if "loss" in r]}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_sentence_transformers(cfg: dict, data: str, student: str, guide: str, workdir: Path) -> dict:
    import datasets
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    try:
        from sentence_transformers.base.sampler import BatchSamplers
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.training_args import BatchSamplers

    device = cfg["device"]
    model = SentenceTransformer(student, device=device)
    model.max_seq_length = cfg["max_len"]
    guide_model = SentenceTransformer(guide, device=device)
    guide_model.max_seq_length = cfg["max_len"]
    loss = CachedGISTEmbedLoss(model, guide_model, temperature=TEMPERATURE, mini_batch_size=cfg["mini"])
    rows = datasets.load_dataset("json", data_files=data, split="train")
    step_s: list[float] = []
    losses: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_s.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = SentenceTransformerTrainingArguments(
        output_dir=str(workdir / "st-out"),
        per_device_train_batch_size=cfg["batch"],
        max_steps=cfg["steps"] + cfg["warmup"],
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
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=rows, loss=loss, callbacks=[StepTimer()])
    trainer.train()
    out = {"step_s": step_s, "losses": losses}
    if device == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = json.loads(args.child_config)
    workdir = Path(args.workdir)
    fn = run_gist_fast if args.child == "gist-fast" else run_sentence_transformers
    out = fn(cfg, args.data, args.student, args.guide, workdir)
    out["peak_rss_mb"] = _peak_rss_mb()
    out["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------ parent
def machine() -> dict:
    import sentence_transformers
    import torch
    import transformers

    import gist_fast

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "gist_fast": gist_fast.__version__,
        "load_average_at_start": os.getloadavg(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def summarise(cfg: dict, res: dict, rows: int) -> dict:
    measured = res["step_s"][cfg["warmup"] :]
    s = dict(res)
    s["samples_per_s"] = cfg["batch"] * len(measured) / sum(measured) if measured else None
    if "cache_s" in res:
        s["first_epoch_samples_per_s_with_cache"] = rows / (res["cache_s"] + sum(res["step_s"]))
    return s


def to_markdown(report: dict) -> str:
    cfg, m = report["config"], report["machine"]
    lines = [
        f"# Training throughput ({report['name']}): gist-fast vs sentence-transformers CachedGISTEmbedLoss",
        "",
        f"{report['date']} · {m['cpu']} · {m['cores']} cores" + (f" · {m['gpu']}" if "gpu" in m else ""),
        f"· torch {m['torch']} · transformers {m['transformers']} · sentence-transformers "
        f"{m['sentence_transformers']} · gist-fast {m['gist_fast']} · load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}",
        "",
        f"Student: first 2 layers of all-MiniLM-L6-v2; guide: all-MiniLM-L6-v2; batch {cfg['batch']}, mini-batch "
        f"{cfg['mini']}, {cfg['max_len']} tokens, {cfg['steps']} measured step(s) after {cfg['warmup']} warm-up, "
        f"device {cfg['device']}, threads {report['threads']}.",
        "",
        "| | samples/s (steps) | step times (s) | peak RSS MB | guide cache (s) | epoch 1 incl. cache (samples/s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for side in SIDES:
        r = report["results"].get(side)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {side} | failed: {r['error'][:80]} | | | | |")
            continue
        cache = f"{r['cache_s']:.1f}" if "cache_s" in r else "— (guide runs every step)"
        first = f"{r['first_epoch_samples_per_s_with_cache']:.2f}" if "cache_s" in r else f"{r['samples_per_s']:.2f}"
        peak = f"{r['peak_rss_mb']:.0f}" + (f" (GPU {r['cuda_peak_mb']:.0f})" if "cuda_peak_mb" in r else "")
        steps = ", ".join(f"{x:.1f}" for x in r["step_s"])
        lines.append(f"| {side} | {r['samples_per_s']:.2f} | {steps} | {peak} | {cache} | {first} |")
    if report.get("speedup") is not None:
        lines += ["", f"Speed-up of gist-fast steps: **{report['speedup']:.2f}x** (target 1.5x)."]
    if report.get("speedup_first_epoch") is not None:
        lines.append(
            f"First epoch over these {report['rows']} rows with the guide cache counted in: "
            f"{report['speedup_first_epoch']:.2f}x; later epochs and reruns reuse the cache."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuda", action="store_true", help="the GPU configuration (batch 65536, mini-batch 512)")
    ap.add_argument("--steps", type=int, help="measured steps (default per configuration)")
    ap.add_argument("--warmup", type=int, help="unmeasured first steps")
    ap.add_argument("--batch", type=int, help="override the contrastive batch")
    ap.add_argument("--mini", type=int, help="override the mini-batch")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads in both subprocesses")
    ap.add_argument("--only", choices=SIDES, action="append", help="run only this side (repeatable)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per side")
    # internal: the subprocess side
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--child-config", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--student", help=argparse.SUPPRESS)
    ap.add_argument("--guide", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = "cuda" if args.cuda else "cpu"
    cfg = dict(CONFIGS[name])
    for key in ("steps", "warmup", "batch", "mini"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gist-fast-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = cfg["batch"] * (cfg["steps"] + cfg["warmup"])
    data = bench_rows(rows, workdir)
    student, guide = models(workdir)
    report = {
        "name": name,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "config": cfg,
        "rows": rows,
        "threads": args.threads or "torch default",
        "results": {},
    }
    for side in args.only or SIDES:
        side_dir = workdir / side
        side_dir.mkdir(exist_ok=True)
        cmd = [
            sys.executable, __file__, "--child", side, "--child-config", json.dumps(cfg), "--data", str(data),
            "--student", student, "--guide", guide, "--workdir", str(side_dir),
        ]  # fmt: skip
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(f"[bench] {side}: batch {cfg['batch']}, mini-batch {cfg['mini']}, {rows} rows ...", file=sys.stderr)
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-2000:]}")
            res = summarise(cfg, json.loads(found[-1][7:]), rows)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            res = {"error": str(e)}
        res["wall_s"] = time.perf_counter() - t
        report["results"][side] = res
        print(f"[bench] {side}: {json.dumps(res)[:400]}", file=sys.stderr)
    out = Path(args.out)
    previous = out / f"train_{name}.json"
    if args.only and previous.exists():  # a side measured by an earlier --only run of the same configuration
        old = json.loads(previous.read_text())
        if old.get("config") == cfg and old.get("threads") == report["threads"]:
            for side, res in old.get("results", {}).items():
                report["results"].setdefault(side, res)
    ours, theirs = (report["results"].get(s, {}) for s in SIDES)
    if ours.get("samples_per_s") and theirs.get("samples_per_s"):
        report["speedup"] = ours["samples_per_s"] / theirs["samples_per_s"]
        report["speedup_first_epoch"] = ours["first_epoch_samples_per_s_with_cache"] / theirs["samples_per_s"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = to_markdown(report)
    (out / f"train_{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
