"""CPU benchmark of the GIST loss: forward+backward time and peak memory, per backend and batch.

Compares gist_fast's ``"reference"`` (materialised B x N logits) and ``"torch"`` (tiled, memory
linear in B) backends with sentence-transformers' ``GISTEmbedLoss`` (embeddings injected, see
st_injection.py) on the shapes of issue 2: d = dg = 384, one negative column, both contrast blocks,
fp32, temperature 0.01, B in {256, 1024, 4096, 16384, 65536} (N = 4B candidate columns per row).

Every (method, B) runs in a fresh subprocess, so one measurement's allocations cannot lower or
raise another's. In the subprocess:

1. a tiny warm-up (B = 64) initialises the thread pools and kernels;
2. the inputs are built (seeded, identical for every method), freed heap memory is handed back to
   the OS (glibc ``malloc_trim(0)``), then the peak-RSS counter is reset
   (``echo 5 > /proc/self/clear_refs``, which sets VmHWM to the current VmRSS) and the current RSS
   is the baseline;
3. a full-size warm-up run (when one run is estimated under 60 s), then the timed repeats of
   ``loss = f(...); loss.backward()`` with the input gradients reset to None before each;
4. peak memory increase = VmHWM - baseline: the high-water mark of the resident set above the
   inputs, gradients and every temporary included. Where clear_refs is not writable the fallback
   is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after minus the RSS before (an upper bound);
   the output says which method was used.

Before a measurement the parent estimates its memory and time (from the last measured batch of the
same method scaled by the method's growth law, else from built-in constants for a 2-core CPU) and
skips it, recording why, when it would not fit in the memory budget (min(--mem-budget-gb,
MemAvailable - 2 GB)) or one run would exceed --max-run-seconds.

Usage:
    .venv/bin/python benchmarks/bench_loss_cpu.py                       # the full table
    .venv/bin/python benchmarks/bench_loss_cpu.py --batches 256,1024 --methods reference,torch

Prints the table on stdout, progress on stderr, and writes ``loss_cpu_<N>core.json`` and ``.md``
under --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

METHODS = ("reference", "torch", "sentence-transformers")
ALIASES = {"st": "sentence-transformers", "sentence_transformers": "sentence-transformers"}
DEFAULT_BATCHES = (256, 1024, 4096, 16384, 65536)
DIM = 384
GUIDE_DIM = 384
TEMPERATURE = 0.01
GB = 1e9

# Growth laws and 2-core-CPU constants for the first estimate of each method, before any of its
# own measurements exist. B x N with N = 4B candidate columns (AP, AA, PP, AN).
#   reference: ~4 fp32 copies of the B x N logits alive at the peak; time ~ B^2 (2.0-2.3 s at 4096
#     measured here, results/loss_cpu_2core.md).
#   sentence-transformers: B x N x d broadcast temporaries: 4.94 GB at B = 512
#     (results/loss_cpu_2core_b512_1thread.md); ~26 s a run there on an unloaded 2-core CPU.
#   torch: linear memory, ~16 B x d fp32 vectors (inputs' gradients, accumulators, normalised
#     copies) plus a few tiles; time ~ B^2 like reference.
MEMORY_LAW = {"reference": 2, "sentence-transformers": 2, "torch": 1}
TIME_LAW = {"reference": 2, "sentence-transformers": 2, "torch": 2}


def prior_memory_bytes(method: str, batch: int) -> float:
    n = 4 * batch
    if method == "reference":
        return 4 * batch * n * 4.0
    if method == "sentence-transformers":
        return 4.4 * GB * (batch / 512) ** 2
    return 16 * batch * DIM * 4.0 + 64e6


def prior_seconds(method: str, batch: int) -> float:
    if method == "sentence-transformers":
        return 26.0 * (batch / 512) ** 2
    return 2.3 * (batch / 4096) ** 2


def default_repeats(batch: int) -> int:
    """Timed repeats per batch size: fewer at big B, where one run takes minutes."""
    if batch <= 1024:
        return 5
    if batch <= 4096:
        return 3
    if batch <= 16384:
        return 2
    return 1


# ----------------------------------------------------------------------------------------------
# Machine description


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def meminfo_bytes(field: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> dict:
    import torch

    try:
        import sentence_transformers

        st_version = sentence_transformers.__version__
    except ImportError:  # pragma: no cover
        st_version = None
    return {
        "cpu_model": cpu_model(),
        "cores": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mem_total_gb": round((meminfo_bytes("MemTotal") or 0) / GB, 1),
        "mem_available_gb_at_start": round((meminfo_bytes("MemAvailable") or 0) / GB, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sentence_transformers": st_version,
        "platform": platform.platform(),
    }


# ----------------------------------------------------------------------------------------------
# Worker: one (method, B) measurement in this process


def _status_kb(field: str) -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return None


def _release_free_heap() -> None:
    """Give malloc's freed-but-resident memory back to the OS (glibc), so that the baseline RSS holds
    no free heap for the measured run to reuse unseen (input building frees B x d temporaries)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_inputs(batch: int, seed: int = 0):
    """Seeded embeddings with some structure: anchor and positive share a topic vector (cosine
    ~0.2, so at temperature 0.01 the loss stays well away from 0), the negative is unrelated, and
    the guide sees the same texts with a little disagreement of its own."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    topic = torch.randn(batch, DIM, generator=gen)
    anchor = topic + 2.0 * torch.randn(batch, DIM, generator=gen)
    positive = topic + 2.0 * torch.randn(batch, DIM, generator=gen)
    negative = torch.randn(batch, DIM, generator=gen)
    del topic
    guide = [x + 1.0 * torch.randn(batch, GUIDE_DIM, generator=gen) for x in (anchor, positive, negative)]
    student = [x.requires_grad_() for x in (anchor, positive, negative)]
    return student, guide


def loss_function(method: str):
    """(student, guide) -> scalar loss, for one method."""
    if method == "sentence-transformers":
        from st_injection import make_st_gist_loss, st_gist_loss

        st_loss = make_st_gist_loss(temperature=TEMPERATURE)

        def run_st(student, guide):
            return st_gist_loss(*student[:2], *guide[:2], student[2], guide[2], loss=st_loss)

        return run_st

    import gist_fast

    def run_gist(student, guide):
        return gist_fast.gist_loss(
            student[0], student[1], guide[0], guide[1], student[2], guide[2], temperature=TEMPERATURE, backend=method
        )

    return run_gist


def worker(method: str, batch: int, repeats: int, full_warmup: bool) -> dict:
    import torch

    fn = loss_function(method)

    def fwd_bwd(student, guide) -> float:
        for x in student:
            x.grad = None
        loss = fn(student, guide)
        loss.backward()
        return loss.item()

    small = make_inputs(64, seed=1)
    fwd_bwd(*small)
    del small

    student, guide = make_inputs(batch)
    _release_free_heap()
    peak_reset = _reset_peak_rss()
    rss_before_kb = _status_kb("VmRSS")
    maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    if full_warmup:
        print(f"  [{method} B={batch}] warm-up run", file=sys.stderr, flush=True)
        fwd_bwd(student, guide)
    times, loss_value = [], None
    for r in range(repeats):
        t0 = time.perf_counter()
        loss_value = fwd_bwd(student, guide)
        times.append(time.perf_counter() - t0)
        print(f"  [{method} B={batch}] run {r + 1}/{repeats}: {times[-1]:.3f} s", file=sys.stderr, flush=True)

    maxrss_after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if peak_reset:
        peak_kb, how = _status_kb("VmHWM"), "VmHWM after clear_refs reset, minus VmRSS at reset"
    else:
        peak_kb, how = maxrss_after_kb, "ru_maxrss after minus VmRSS before (upper bound)"
    return {
        "method": method,
        "batch": batch,
        "status": "ok",
        "times_s": times,
        "median_s": statistics.median(times),
        "full_warmup": full_warmup,
        "loss": loss_value,
        "peak_increase_bytes": (peak_kb - rss_before_kb) * 1024,
        "memory_method": how,
        "rss_inputs_bytes": rss_before_kb * 1024,
        "ru_maxrss_before_bytes": maxrss_before_kb * 1024,
        "ru_maxrss_after_bytes": maxrss_after_kb * 1024,
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------
# Parent: plan, spawn, collect, report


def useful_flops(batch: int) -> float:
    """The useful minimum 2BN(3d + dg) (benchmarks/NOTES.md): S and Gd forward, two gradient products."""
    return 2.0 * batch * (4 * batch) * (3 * DIM + GUIDE_DIM)


class Estimator:
    """Memory and time of the next measurement, from the last one of the same method if any."""

    def __init__(self) -> None:
        self.last: dict[str, dict] = {}

    def update(self, result: dict) -> None:
        if result["status"] == "ok":
            self.last[result["method"]] = result

    def estimate(self, method: str, batch: int) -> tuple[float, float, str]:
        prev = self.last.get(method)
        if prev is None:
            return prior_memory_bytes(method, batch), prior_seconds(method, batch), "prior"
        ratio = batch / prev["batch"]
        memory = max(prev["peak_increase_bytes"], 1e6) * ratio ** MEMORY_LAW[method]
        seconds = prev["median_s"] * ratio ** TIME_LAW[method]
        if method == "torch":  # the tiles are a constant floor: keep the prior when it is larger
            memory = max(memory, prior_memory_bytes(method, batch))
        return memory, seconds, f"scaled from B={prev['batch']}"


def run_one(method: str, batch: int, repeats: int, full_warmup: bool, timeout: float, threads: int | None) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--methods",
        method,
        "--batches",
        str(batch),
        "--repeats",
        str(repeats),
    ]
    if full_warmup:
        cmd.append("--full-warmup")
    if threads is not None:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"method": method, "batch": batch, "status": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"method": method, "batch": batch, "status": f"failed (exit {proc.returncode})"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["subprocess_wall_s"] = time.perf_counter() - t0
    # Other work on a shared CPU shows up here: a 1-minute load above the core count means contention.
    result["loadavg_1min_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def fmt_bytes(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.0f} MB"


def fmt_seconds(s: float) -> str:
    return f"{s:.3f} s" if s < 10 else f"{s:.1f} s"


def table_rows(results: list[dict]) -> list[list[str]]:
    reference = {r["batch"]: r for r in results if r["method"] == "reference" and r["status"] == "ok"}
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([str(r["batch"]), r["method"], r["status"], "", "", "", "", ""])
            continue
        ref = reference.get(r["batch"])
        vs_ref = f"{r['median_s'] / ref['median_s']:.2f}x" if ref else "-"
        loss_diff = f"{abs(r['loss'] - ref['loss']) / max(abs(ref['loss']), 1e-30):.1e}" if ref else "-"
        times = r["times_s"]
        spread = f"{min(times):.3g}-{max(times):.3g}" if len(times) > 1 else "-"
        gflops = useful_flops(r["batch"]) / r["median_s"] / 1e9
        rows.append(
            [
                str(r["batch"]),
                r["method"],
                fmt_seconds(r["median_s"]) + f" (n={len(times)})",
                spread,
                vs_ref,
                fmt_bytes(r["peak_increase_bytes"]),
                f"{gflops:.0f}",
                f"{r['loss']:.6f} ({loss_diff})",
            ]
        )
    return rows


HEADER = [
    "B",
    "method",
    "fwd+bwd median",
    "range (s)",
    "time / reference",
    "peak mem increase",
    "GFLOP/s*",
    "loss (rel. diff vs reference)",
]


def markdown(results: list[dict], meta: dict) -> str:
    m = meta["machine"]
    lines = [
        f"# GIST loss on the CPU: forward+backward ({m['cores']} cores)",
        "",
        f"- Machine: {m['cpu_model']}, {m['cores']} cores, {m['mem_total_gb']} GB RAM "
        f"({m['mem_available_gb_at_start']} GB available at start); torch threads per measurement: "
        f"{meta['threads']}",
        f"- Versions: Python {m['python']}, torch {m['torch']}, sentence-transformers {m['sentence_transformers']}",
        f"- Date: {meta['date']}",
        f"- Command: `{meta['command']}`",
        f"- Shapes: d = {DIM}, guide dim = {GUIDE_DIM}, one negative column, AP+AA+PP+AN blocks "
        f"(N = 4B columns), fp32, temperature {TEMPERATURE}, margin 0 (absolute).",
        f"- Time: median of the timed runs after a warm-up; {meta['warmup']}",
        f"- Memory: {meta['memory_method']}; each (method, B) in a fresh subprocess.",
        "- The CPU is shared with other work: compare methods at the same B (run back to back), "
        "i.e. read the ratio column rather than absolute seconds.",
        "- GFLOP/s*: useful minimum 2BN(3d+dg) (benchmarks/NOTES.md) divided by the median time.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines) + "\n"


def print_table(results: list[dict]) -> None:
    rows = [HEADER, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def parse_list(text: str, kind):
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)), help="comma-separated B values")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated: reference, torch, st")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per (method, B); default 5 up to B=1024, 3 at 4096, 2 at 16384, 1 above "
        "(above B=4096 this can only lower the default)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results", help="directory for the JSON and markdown")
    ap.add_argument("--tag", default=None, help="file name suffix (default <cores>core)")
    ap.add_argument("--mem-budget-gb", type=float, default=16.0, help="skip what would need more (default 16)")
    ap.add_argument("--max-run-seconds", type=float, default=1500.0, help="skip where one run would take longer")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads in every measurement (default: torch's own, one per core). On a CPU "
        "shared with other jobs, 1 avoids OpenMP barrier stalls that dwarf the work at small B",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--full-warmup", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.methods = [ALIASES.get(m, m) for m in parse_list(args.methods, str)]
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)} (or st)")
    args.batches = parse_list(args.batches, int)
    return args


def display_command() -> str:
    exe = Path(sys.executable)
    try:
        exe_text = str(exe.relative_to(Path.cwd()))
    except ValueError:
        exe_text = str(exe)
    return shlex.join([exe_text, *sys.argv])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(HERE))
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        result = worker(args.methods[0], args.batches[0], args.repeats or 1, args.full_warmup)
        print(json.dumps(result))
        return 0

    meta = {
        "machine": machine_info(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": display_command(),
        "warmup": "a B = 64 run first in every subprocess, plus one full-size run where it is estimated under 60 s",
        "shapes": {"dim": DIM, "guide_dim": GUIDE_DIM, "negatives": 1, "dtype": "float32", "temperature": TEMPERATURE},
    }
    meta["threads"] = (
        args.threads if args.threads is not None else f"{meta['machine']['torch_threads']} (torch default)"
    )
    print(f"machine: {meta['machine']}", file=sys.stderr)
    estimator = Estimator()
    results: list[dict] = []
    memory_method = None
    for batch in args.batches:
        for method in args.methods:
            available = meminfo_bytes("MemAvailable")
            budget = args.mem_budget_gb * GB
            if available is not None:
                budget = min(budget, available - 2 * GB)
            memory, seconds, basis = estimator.estimate(method, batch)
            base = {"method": method, "batch": batch, "estimate_bytes": memory, "estimate_s": seconds}
            if memory > budget:
                why = f"skipped: needs ~{memory / GB:.1f} GB ({basis}; budget {budget / GB:.1f} GB)"
            elif seconds > args.max_run_seconds:
                why = f"skipped: ~{seconds / 60:.0f} min a run ({basis}; limit {args.max_run_seconds / 60:.0f} min)"
            else:
                why = None
            if why:
                print(f"{method} B={batch}: {why}", file=sys.stderr, flush=True)
                results.append({**base, "status": why})
                continue
            repeats = default_repeats(batch) if args.repeats is None else args.repeats
            if batch > 4096:  # one run takes minutes there: --repeats only lowers the default
                repeats = min(repeats, default_repeats(batch))
            full_warmup = seconds < 60
            # Generous: a shared CPU can be several times slower than the estimate.
            timeout = max(900.0, 10 * seconds * (repeats + full_warmup + 1))
            print(
                f"{method} B={batch}: est. {fmt_bytes(memory)}, {fmt_seconds(seconds)} a run ({basis}); "
                f"{repeats} timed run(s){' + warm-up' if full_warmup else ''}",
                file=sys.stderr,
                flush=True,
            )
            result = {**base, **run_one(method, batch, repeats, full_warmup, timeout, args.threads)}
            if result["status"] == "ok":
                memory_method = result["memory_method"]
                print(
                    f"{method} B={batch}: median {fmt_seconds(result['median_s'])}, "
                    f"peak +{fmt_bytes(result['peak_increase_bytes'])}, loss {result['loss']:.6f}",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                print(f"{method} B={batch}: {result['status']}", file=sys.stderr, flush=True)
            estimator.update(result)
            results.append(result)

    meta["memory_method"] = memory_method or "n/a"
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"{meta['machine']['cores']}core"
    json_path = args.out / f"loss_cpu_{tag}.json"
    md_path = args.out / f"loss_cpu_{tag}.md"
    json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    md_path.write_text(markdown(results, meta))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
