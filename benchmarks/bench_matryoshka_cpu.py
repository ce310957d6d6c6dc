"""CPU benchmark of the Matryoshka GIST loss: five dims in one pass against one dim and against
sentence-transformers' ``MatryoshkaLoss(GISTEmbedLoss)``.

Shapes (issue 13): d = 768, guide dim 1024, one negative column, both contrast blocks (N = 4B
columns), fp32, temperature 0.01, Matryoshka dims (768, 512, 256, 128, 64) with weights 1.
Methods, each forward+backward on the same seeded inputs:

- ``<backend>:matryoshka``: ``gist_loss(..., matryoshka_dims=DIMS, backend=<backend>)``;
- ``<backend>:single``: the plain 768-dim loss on the same backend (the 1x of the targets);
- ``<backend>:per-dim``: five plain losses on sliced inputs, summed (what a one-pass path saves);
- ``st``: sentence-transformers' own ``MatryoshkaLoss`` around its ``GISTEmbedLoss``, their code
  unchanged: a stand-in model whose forward returns the given student embeddings (so their
  ``ForwardDecorator`` truncates and caches them as it does a real model's) and the guide's
  embeddings injected as in st_injection.py; only the encoders are left out of the timing.

The CPU is shared and its load varies, so methods are interleaved: each round runs every method
once, at one B, each in a fresh subprocess (a B = 64 warm-up, the inputs, the peak-RSS counter reset
as in bench_loss_cpu.py, then ``repeats`` timed runs). The report gives each method's median and,
for the targets, the median over rounds of the per-round ratios (a round's methods ran back to
back). A measurement estimated not to fit in memory (min(--mem-budget-gb, MemAvailable - 2 GB)) is
skipped and recorded with its estimate.

Usage:
    .venv/bin/python benchmarks/bench_matryoshka_cpu.py                      # B = 1024, 4096; torch
    .venv/bin/python benchmarks/bench_matryoshka_cpu.py --batches 256 --methods torch:matryoshka,st
    .venv/bin/python benchmarks/bench_matryoshka_cpu.py --batches 1024 --threads 1 --rounds 5 --repeats 3 \
        --methods cpp:single,cpp:matryoshka,cpp:per-dim --tag cpp_2core_1thread   # the C++ backend

Writes ``matryoshka_cpu_<tag>.json`` and ``.md`` under --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_loss_cpu import (  # noqa: E402
    GB,
    _release_free_heap,
    _reset_peak_rss,
    _status_kb,
    display_command,
    fmt_bytes,
    machine_info,
    meminfo_bytes,
)

DIM, GUIDE_DIM = 768, 1024
DIMS = (768, 512, 256, 128, 64)
TEMPERATURE = 0.01
DEFAULT_BATCHES = (1024, 4096)
DEFAULT_METHODS = ("torch:single", "torch:matryoshka", "torch:per-dim", "st")


# ----------------------------------------------------------------------------------------------
# Predicted executed FLOPs (NOTES.md, "Matryoshka"): two-pass plan, N = 4B columns per row.


def executed_flops(method: str, batch: int) -> float:
    n = 4 * batch
    if method.endswith(":single"):
        per_entry = 4 * DIM + 2 * GUIDE_DIM  # each pass: S (d), Gd (dg), one gradient product (d)
    elif method.endswith(":matryoshka"):
        # each pass: Gd once, the student dots once up to max(DIMS), one gradient product per dim
        per_entry = 2 * (GUIDE_DIM + max(DIMS) + sum(DIMS))
    else:  # per-dim composition; sentence-transformers does at least this much
        per_entry = sum(4 * m + 2 * GUIDE_DIM for m in DIMS)
    return 2.0 * batch * n * per_entry


def prior_memory_bytes(method: str, batch: int) -> float:
    """Estimates before measuring. sentence-transformers broadcasts (rows, 1, dim) against
    (1, cols, dim) for every block's cosines, guide included: about 16 B x B x dg fp32 temporaries
    alive at once (1.14 GB measured at B = 128 here; bench_loss_cpu.py: 4.4 GB at B = 512, d = dg = 384)."""
    if method == "st":
        return 16.0 * batch * batch * GUIDE_DIM * 4  # measured 1.14 GB at B = 128
    # gist-fast: inputs' gradients, per-dim accumulators, normalised copies, a few tiles.
    return 4.0 * batch * (4 * DIM + 2 * sum(DIMS)) * 4 + 200e6


# ----------------------------------------------------------------------------------------------
# Worker


def make_inputs(batch: int, seed: int = 0):
    """Seeded fp32 embeddings: anchor and positive share a topic, the negative is unrelated, and the
    guide sees the same items (plus noise of its own) in its own 1024 dims."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    topic = torch.randn(batch, DIM, generator=gen)
    student = [topic + 2.0 * torch.randn(batch, DIM, generator=gen) for _ in range(2)]
    student.append(torch.randn(batch, DIM, generator=gen))
    lift = torch.randn(DIM, GUIDE_DIM, generator=gen) / DIM**0.5
    guide = [x @ lift + 0.5 * torch.randn(batch, GUIDE_DIM, generator=gen) for x in student]
    return [x.requires_grad_() for x in student], guide


class _InjectedModel:
    """A stand-in SentenceTransformer for sentence-transformers' MatryoshkaLoss: its forward returns
    the embedding carried in the features, so their ForwardDecorator truncates and caches it."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def forward(self, features: dict) -> dict:
        return {"sentence_embedding": features["embedding"]}

    def __call__(self, features: dict) -> dict:
        return self.forward(features)  # the instance attribute their decorator installs, if any

    def get_embedding_dimension(self) -> int:
        return self.dim


def st_matryoshka(student, guide, dims=DIMS, temperature=TEMPERATURE):
    """sentence-transformers' MatryoshkaLoss(GISTEmbedLoss) on the given embeddings.

    Args:
        student: [anchor, positive, negative], each (B, d); the prefix dims are taken from these.
        guide: the guide's [anchor, positive, negative], each (B, dg), never truncated.
        dims: the Matryoshka prefix dims, each in [1, d] (default this benchmark's five of 768).
        temperature: GISTEmbedLoss's temperature.
    (benchmarks/bench_triton_gpu.py times it on the GPU with the same helper.)
    """
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss
    from st_injection import _gist_module, make_st_gist_loss

    inner = make_st_gist_loss(temperature=temperature)
    model = inner.model = _InjectedModel(student[0].shape[1])
    loss = MatryoshkaLoss(model, inner, list(dims))
    original = _gist_module.embed_columns

    def embed_columns(which, features_list, *args, **kwargs):
        if which is inner.guide:
            return list(guide)
        return [which(features)["sentence_embedding"] for features in features_list]

    _gist_module.embed_columns = embed_columns
    try:
        return loss([{"embedding": x} for x in student], None)
    finally:
        _gist_module.embed_columns = original


def loss_function(method: str):
    if method == "st":
        return st_matryoshka
    import gist_fast

    backend, kind = method.split(":")

    def plain(student, guide, dim):
        return gist_fast.gist_loss(
            student[0][:, :dim], student[1][:, :dim], guide[0], guide[1], student[2][:, :dim], guide[2],
            temperature=TEMPERATURE, backend=backend,
        )  # fmt: skip

    if kind == "single":
        return lambda student, guide: plain(student, guide, DIM)
    if kind == "per-dim":
        return lambda student, guide: sum(plain(student, guide, m) for m in DIMS)

    def matryoshka(student, guide):
        return gist_fast.gist_loss(
            student[0], student[1], guide[0], guide[1], student[2], guide[2],
            temperature=TEMPERATURE, backend=backend, matryoshka_dims=DIMS,
        )  # fmt: skip

    return matryoshka


def worker(method: str, batch: int, repeats: int) -> dict:
    import torch

    fn = loss_function(method)

    def fwd_bwd(student, guide) -> float:
        for x in student:
            x.grad = None
        loss = fn(student, guide)
        loss.backward()
        return loss.item()

    fwd_bwd(*make_inputs(64, seed=1))
    student, guide = make_inputs(batch)
    _release_free_heap()
    peak_reset = _reset_peak_rss()
    rss_before_kb = _status_kb("VmRSS")
    times, loss_value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss_value = fwd_bwd(student, guide)
        times.append(time.perf_counter() - t0)
    peak_kb = _status_kb("VmHWM") if peak_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "method": method,
        "batch": batch,
        "status": "ok",
        "times_s": times,
        "loss": loss_value,
        "peak_increase_bytes": (peak_kb - rss_before_kb) * 1024,
        "memory_method": "VmHWM after clear_refs reset" if peak_reset else "ru_maxrss (upper bound)",
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------
# Parent


def run_one(method: str, batch: int, repeats: int, threads: int | None, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--methods", method, "--batches", str(batch)]
    cmd += ["--repeats", str(repeats)] + (["--threads", str(threads)] if threads else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    load_before = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"method": method, "batch": batch, "status": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"method": method, "batch": batch, "status": f"failed (exit {proc.returncode})"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def summarise(rounds: list[list[dict]], methods: list[str], batch: int) -> list[dict]:
    """One row per method: median time over all rounds, peak memory, and the median over rounds of
    its time divided by the same round's single-dim loss and sentence-transformers' time."""
    rows = []
    for method in methods:
        runs = [r for rnd in rounds for r in rnd if r["method"] == method]
        ok = [r for r in runs if r["status"] == "ok"]
        if not ok:
            rows.append({"method": method, "batch": batch, "status": runs[0]["status"] if runs else "not run"})
            continue
        times = [t for r in ok for t in r["times_s"]]
        row = {
            "method": method,
            "batch": batch,
            "status": "ok",
            "median_s": statistics.median(times),
            "times_s": times,
            "peak_increase_bytes": max(r["peak_increase_bytes"] for r in ok),
            "loss": ok[-1]["loss"],
            "executed_gflop": executed_flops(method, batch) / 1e9 if method != "st" else None,
            "loadavg": [r.get("loadavg_1min_before_after") for r in ok],
        }
        backend = method.split(":")[0]
        for key, other in (("vs_single", f"{backend}:single"), ("vs_st", "st")):
            ratios = []
            for rnd in rounds:
                mine = [r for r in rnd if r["method"] == method and r["status"] == "ok"]
                theirs = [r for r in rnd if r["method"] == other and r["status"] == "ok"]
                if mine and theirs and other != method:
                    ratios.append(statistics.median(mine[0]["times_s"]) / statistics.median(theirs[0]["times_s"]))
            row[key] = statistics.median(ratios) if ratios else None
        rows.append(row)
    return rows


HEADER = ["B", "method", "fwd+bwd median", "vs single (same round)", "vs ST (same round)", "peak mem increase",
          "executed GFLOP (predicted)", "loss"]  # fmt: skip


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append([str(r["batch"]), r["method"], r["status"], "", "", "", "", ""])
            continue
        ratio = lambda x: "-" if x is None else f"{x:.3g}x"  # noqa: E731
        gflop = "-" if r["executed_gflop"] is None else f"{r['executed_gflop']:.0f}"
        out.append([
            str(r["batch"]), r["method"], f"{r['median_s']:.2f} s (n={len(r['times_s'])})", ratio(r["vs_single"]),
            ratio(r["vs_st"]), fmt_bytes(r["peak_increase_bytes"]), gflop, f"{r['loss']:.6f}",
        ])  # fmt: skip
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    m = meta["machine"]
    lines = [
        f"# Matryoshka GIST loss on the CPU: five dims in one pass ({m['cores']} cores)",
        "",
        f"- Machine: {m['cpu_model']}, {m['cores']} cores, {m['mem_total_gb']} GB RAM "
        f"({m['mem_available_gb_at_start']} GB available at start), shared with other jobs; "
        f"torch threads: {meta['threads']}",
        f"- Versions: Python {m['python']}, torch {m['torch']}, sentence-transformers {m['sentence_transformers']}, "
        f"gist-fast at git {meta['git']}",
        f"- Date: {meta['date']}; command: `{meta['command']}`",
        f"- Shapes: d = {DIM}, guide dim = {GUIDE_DIM}, one negative column, AP+AA+PP+AN (N = 4B), fp32, "
        f"temperature {TEMPERATURE}; Matryoshka dims {DIMS}, weights 1.",
        f"- {meta['rounds']} interleaved round(s) per B, {meta['repeats']} timed run(s) per method a round, each "
        "method in a fresh subprocess after a B = 64 warm-up; ratios are medians over rounds of same-round ratios.",
        "- Memory: peak resident set above the inputs (VmHWM after a clear_refs reset).",
        "- Executed GFLOP: the two-pass plan's prediction (NOTES.md, Matryoshka): single "
        "2BN(4d+2dg), one pass 2BN(2dg+2max(m)+2 sum(m)), per dim sum over m of 2BN(4m+2dg).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(rows)]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)))
    kinds = ("single", "matryoshka", "per-dim")
    methods_help = f"comma-separated: <backend>:<kind> (kind: {', '.join(kinds)}; backend: torch, cpp, ...) and st"
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=methods_help)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per B (default 2)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per method and round (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per measurement (default torch's)")
    ap.add_argument("--mem-budget-gb", type=float, default=12.0, help="skip what would need more (default 12)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess (default 1800)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--tag", default=None, help="file name suffix (default <cores>core)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in args.methods:
        if method != "st" and (method.count(":") != 1 or method.split(":")[1] not in kinds):
            ap.error(f"unknown method {method!r}: use <backend>:single|matryoshka|per-dim or st")
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.methods[0], args.batches[0], args.repeats)))
        return 0
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    meta = {
        "machine": machine_info(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": display_command(),
        "git": git.stdout.strip() or "unknown",
        "rounds": args.rounds,
        "repeats": args.repeats,
        "threads": args.threads or "torch default",
        "dims": DIMS,
        "shapes": {"dim": DIM, "guide_dim": GUIDE_DIM, "negatives": 1, "dtype": "float32", "temperature": TEMPERATURE},
    }
    rows: list[dict] = []
    for batch in args.batches:
        rounds: list[list[dict]] = []
        for round_index in range(args.rounds):
            results = []
            for method in args.methods:
                available = meminfo_bytes("MemAvailable")
                budget = min(args.mem_budget_gb * GB, (available or 1e18) - 2 * GB)
                need = prior_memory_bytes(method, batch)
                if need > budget:
                    status = f"skipped: needs ~{need / GB:.0f} GB (estimate; budget {budget / GB:.1f} GB)"
                    results.append({"method": method, "batch": batch, "status": status})
                else:
                    results.append(run_one(method, batch, args.repeats, args.threads, args.timeout))
                r = results[-1]
                shown = r["status"] if r["status"] != "ok" else f"{statistics.median(r['times_s']):.2f} s"
                print(f"B={batch} round {round_index + 1} {method}: {shown}", file=sys.stderr, flush=True)
            rounds.append(results)
        rows += summarise(rounds, args.methods, batch)
    tag = args.tag or f"{meta['machine']['cores']}core"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"matryoshka_cpu_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    report = markdown(rows, meta)
    (args.out / f"matryoshka_cpu_{tag}.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
