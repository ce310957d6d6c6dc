"""The native C++ backend ("cpp") against the tiled torch backend ("torch") on this CPU.

Shapes of issue 2: d = dg = 384, one negative column, both contrast blocks (N = 4B columns per
row), fp32, temperature 0.01, reduction "mean", forward + backward. Both backends run in the same
process on the same inputs, alternating (torch, cpp, torch, cpp, ...) so that a change in the
machine's load hits both alike; each batch up to 4096 gets one untimed warm-up per backend, then the median of
--repeats timed runs. The C++ extension is compiled (or loaded from its cache) before timing.

Usage:
    .venv/bin/python benchmarks/bench_cpp_vs_torch_cpu.py                 # B in 1024, 4096, 16384
    .venv/bin/python benchmarks/bench_cpp_vs_torch_cpu.py --batches 1024 --repeats 3 --label before

Writes ``cpp_vs_torch_cpu.json`` and ``.md`` under --out (default benchmarks/results/); with
--label, the run is added to (or replaces) that label's entry in the JSON, so "before" and
"after" runs sit side by side.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_loss_cpu import cpu_model  # noqa: E402  (one description of the machine for every result)

import gist_fast  # noqa: E402
from gist_fast.backends.cpp_backend import load_extension  # noqa: E402

DIM = 384
GUIDE_DIM = 384
TEMPERATURE = 0.01
BACKENDS = ("torch", "cpp")


def make_inputs(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, DIM, generator=gen)
    p = a + torch.randn(batch, DIM, generator=gen)
    n = a + torch.randn(batch, DIM, generator=gen)
    ga = torch.randn(batch, GUIDE_DIM, generator=gen)
    gp = ga + torch.randn(batch, GUIDE_DIM, generator=gen)
    gn = ga + torch.randn(batch, GUIDE_DIM, generator=gen)
    return [a, p, n], [ga, gp, gn]


def run_once(backend: str, student, guide) -> tuple[float, float]:
    s = [t.detach().requires_grad_() for t in student]
    start = time.perf_counter()
    loss = gist_fast.gist_loss(s[0], s[1], guide[0], guide[1], s[2], guide[2], temperature=TEMPERATURE, backend=backend)
    loss.backward()
    return time.perf_counter() - start, loss.item()


def measure(batch: int, repeats: int) -> dict:
    student, guide = make_inputs(batch)
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    losses = {}
    if batch <= 4096:  # warm-up (a bigger run is long enough to need none)
        for b in BACKENDS:
            _, losses[b] = run_once(b, student, guide)
    for _ in range(repeats):
        for b in BACKENDS:
            seconds, losses[b] = run_once(b, student, guide)
            times[b].append(seconds)
            print(f"  B={batch} {b}: {seconds:.3f} s", file=sys.stderr, flush=True)
    med = {b: statistics.median(t) for b, t in times.items()}
    flops = 2 * batch * (4 * batch) * (3 * DIM + GUIDE_DIM)  # the useful minimum (benchmarks/NOTES.md)
    return {
        "batch": batch,
        "columns": 4 * batch,
        "times_s": times,
        "median_s": med,
        "speedup_cpp_over_torch": med["torch"] / med["cpp"],
        "effective_gflops": {b: flops / med[b] / 1e9 for b in BACKENDS},
        "loss": losses,
    }


def write_markdown(path: Path, doc: dict) -> None:
    lines = [
        "# C++ backend vs torch backend, CPU",
        "",
        f"CPU: {doc['machine']['cpu']}, {doc['machine']['cores']} cores; torch {doc['machine']['torch']}, "
        f"Python {doc['machine']['python']}.",
        f"Shapes: d = dg = {DIM}, one negative, both contrast blocks (N = 4B), fp32, mean, forward + backward; "
        "alternating runs in one process, median of the repeats.",
        "",
    ]
    for label, run in doc["runs"].items():
        dirty = (", ".join(run["uncommitted"]) or "none") if "uncommitted" in run else "not recorded"
        lines += [
            f"## {label}",
            "",
            f"`{run['command']}` ({run['date']}, commit {run.get('commit', '?')}; uncommitted: {dirty}; "
            f"load average before/after: {run.get('load_average_before', '?')} / {run.get('load_average_after', '?')})",
            "",
            f"Threads: {run.get('threads', doc['machine']['cores'])}. {run.get('note', '')}".rstrip(),
            "",
            "| B | torch (s) | cpp (s) | torch / cpp | cpp GFLOP/s (useful) | repeats |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in run["results"]:
            lines.append(
                f"| {r['batch']} | {r['median_s']['torch']:.3f} | {r['median_s']['cpp']:.3f} | "
                f"{r['speedup_cpp_over_torch']:.2f}x | {r['effective_gflops']['cpp']:.0f} | "
                f"{len(r['times_s']['cpp'])} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1024,4096,16384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--label", default="latest")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    load_extension()
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "gist_fast", "csrc"], capture_output=True, text=True, cwd=HERE
    ).stdout.split()[1::2]
    run = {
        "command": shlex.join([".venv/bin/python", "benchmarks/bench_cpp_vs_torch_cpu.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit.strip(),
        "uncommitted": dirty,  # backends measured as they were in the working tree
        "load_average_before": os.getloadavg(),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "results": [],
    }
    for batch in [int(b) for b in args.batches.split(",")]:
        result = measure(batch, args.repeats)
        run["results"].append(result)
        print(
            f"B={batch}: torch {result['median_s']['torch']:.3f} s, cpp {result['median_s']['cpp']:.3f} s, "
            f"torch/cpp {result['speedup_cpp_over_torch']:.2f}x",
            flush=True,
        )

    args.out.mkdir(parents=True, exist_ok=True)
    run["load_average_after"] = os.getloadavg()
    json_path = args.out / "cpp_vs_torch_cpu.json"
    doc = json.loads(json_path.read_text()) if json_path.exists() else {"runs": {}}
    doc["machine"] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    doc["runs"][args.label] = run
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    write_markdown(args.out / "cpp_vs_torch_cpu.md", doc)


if __name__ == "__main__":
    main()
