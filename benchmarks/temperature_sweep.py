"""Gradient error of every CPU backend at small temperatures, against the float64 reference.

The evidence behind ``gist_fast.inputs.MIN_TEMPERATURE`` (docs/loss.md, "Precision and numerical
range"). For each temperature, random problems (tests/problems.py's draw_problem: B = 17, d = 64,
dg = 48, one negative column, mean reduction; correlated and uncorrelated draws) are computed in
float32 by each backend and in float64 by the reference; the error reported is the largest
``|grad - grad64|`` over all student inputs, in units of the gradient's natural scale
``1 / (temperature * B * min ||x||)`` (the size of one row's contribution), and "NaN" where a
gradient is not finite. The temperature check of `gist_loss` is bypassed (the backends are called
on validated inputs with the temperature replaced), since the point is to see below it.

    .venv/bin/python benchmarks/temperature_sweep.py --out benchmarks/results/temperature_sweep_cpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from problems import draw_problem  # noqa: E402

from gist_fast.backends import get_backend  # noqa: E402
from gist_fast.inputs import MIN_TEMPERATURE, validate  # noqa: E402

TEMPERATURES = [1e-2, 1e-3, 1e-4, 3e-5, 1e-5, 1e-6, 1e-8, 1e-9, 3e-10, 1e-10, 1e-12]
BACKENDS = ["reference", "torch", "cpp", "triton"]


def grads(backend: str, problem, dtype: torch.dtype, temperature: float) -> list[torch.Tensor]:
    student = [t.detach().to(dtype).requires_grad_() for t in problem.student]
    guide = [t.detach().to(dtype) for t in problem.guide]
    inputs, options = validate(
        student[0], student[1], guide[0], guide[1], student[2:] or None, guide[2:] or None,
        temperature=1.0, margin_strategy="absolute", margin=0.0, contrast_anchors=True,
        contrast_positives=True, reduction="mean",
    )  # fmt: skip
    options = dataclasses.replace(options, temperature=temperature)
    loss = get_backend(backend, inputs)(inputs, options)
    return list(torch.autograd.grad(loss, student))


def worst_error(backend: str, problem, temperature: float) -> float:
    as_float32 = [t.float().double() for t in problem.student], [t.float().double() for t in problem.guide]
    rounded = dataclasses.replace(problem, student=as_float32[0], guide=as_float32[1])
    expected = grads("reference", rounded, torch.float64, temperature)
    got = grads(backend, problem, torch.float32, temperature)
    worst = 0.0
    for g, e, x in zip(got, expected, rounded.student, strict=True):
        if not torch.isfinite(g).all():
            return float("nan")
        scale = 1.0 / (temperature * x.shape[0] * x.norm(dim=1).min().item())
        worst = max(worst, (g.double() - e).abs().max().item() / scale)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="problems per (temperature, correlated) cell")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    args = ap.parse_args()
    torch.set_num_threads(1)
    backends = args.backends.split(",")
    rows = []
    for temperature in TEMPERATURES:
        worst = dict.fromkeys(backends, 0.0)
        for seed in range(args.seeds):
            for correlated in (True, False):
                problem = draw_problem(
                    random.Random(f"sweep-{seed}"), 17, 64, 48, 1, options={}, correlated=correlated
                )
                for backend in backends:
                    error = worst_error(backend, problem, temperature)
                    worst[backend] = error if error != error else max(worst[backend], error)  # NaN sticks
        line = f"| {temperature:g} | " + " | ".join(
            "NaN" if worst[b] != worst[b] else f"{worst[b]:.1e}" for b in backends
        ) + " |"  # fmt: skip
        print(line, flush=True)
        rows.append(line)
    text = "\n".join(
        [
            "# Gradient error at small temperatures (CPU, float32 against the float64 reference)",
            "",
            f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch threads 1",
            f"- Versions: Python {platform.python_version()}, torch {torch.__version__}"
            + (f", triton {__import__('triton').__version__} (TRITON_INTERPRET=1)" if "triton" in backends else ""),
            f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- Command: `{' '.join(['.venv/bin/python', *sys.argv])}`",
            f"- Problems: B = 17, d = 64, dg = 48, one negative column, mean reduction, margin 0; {args.seeds} "
            "seeds x (correlated, uncorrelated) per temperature; worst over them.",
            "- Error: max |grad - grad64| over all student inputs, in units of 1 / (temperature * B * min ||x||);"
            " NaN: a non-finite gradient. `gist_loss` refuses temperatures below "
            f"{MIN_TEMPERATURE:g} (gist_fast.inputs.MIN_TEMPERATURE).",
            "",
            "| temperature | " + " | ".join(backends) + " |",
            "|---|" + "---|" * len(backends),
            *rows,
            "",
        ]
    )
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
