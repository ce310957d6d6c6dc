"""Worst gradient error of the Triton plans over many random problems, against the float64 oracle.

Draws problems as `tests/test_triton_backend.py::test_dtypes` does (problems.draw_random_problem,
B <= 17, d and dg in {1, 7, 24, 40}) and reports, per plan, the largest gradient error as a fraction
of the tests' stated tolerance (problems.TOLERANCES, with the same floors as
problems.assert_matches_oracle): 1.0 is where a test would fail. Runs under the Triton interpreter
on a CPU (16-wide tiles, small chunks), whose rounding of the 16-bit weights matches the GPU build.

    GIST_TEST_SEED=1 TRITON_INTERPRET=1 .venv/bin/python benchmarks/grad_error_sweep.py --dtype bfloat16 --draws 1000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from problems import SESSION_SEED, TOLERANCES, draw_random_problem, loss_and_grads, oracle, upstream_weight  # noqa: E402

from gist_fast.backends.triton import Chunks, gist_loss_triton  # noqa: E402
from gist_fast.backends.triton.fused import INTERPRETER_BLOCKS  # noqa: E402
from gist_fast.inputs import validate  # noqa: E402

PLANS = {
    "fused": INTERPRETER_BLOCKS,
    "chunked": Chunks(rows=16, columns=24, tile_m=16, tile_n=16, tile_k=16, gemm_m=16, gemm_n=16, gemm_k=16),
}
DEFAULTS = {"temperature": 0.01, "margin_strategy": "absolute", "margin": 0.0, "contrast_anchors": True,
            "contrast_positives": True, "reduction": "mean"}  # fmt: skip


def loss_fn(plan):
    def fn(a, p, ga, gp, n, gn, **options):
        inputs, opts = validate(a, p, ga, gp, n, gn, **(DEFAULTS | options))
        return gist_loss_triton(inputs, opts, blocks=plan)

    return fn


def worst_ratio(problem, dtype, grads, expected) -> float:
    """max over gradients of error / (tolerance x max(|expected|, floor)), as the tests measure it."""
    logit_scale = 1.0 / problem.options.get("temperature", 0.01)
    weight = upstream_weight(problem).abs().max().item()
    rows = 1 if problem.options.get("reduction", "mean") == "mean" else problem.student[0].shape[0]
    worst = 0.0
    for got, want, x in zip(grads, expected, problem.student, strict=True):
        floor = 5e-2 * logit_scale * weight / x.norm(dim=1).min().item() * rows
        scale = max(want.abs().max().item(), floor)
        worst = max(worst, (got.double() - want).abs().max().item() / scale / TOLERANCES[dtype]["grad"])
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    worst = {name: (0.0, None) for name in PLANS}
    for draw in range(args.draws):
        problem = draw_random_problem(random.Random(draw), max_batch=17, dims=[1, 7, 24, 40])
        _, expected = oracle(problem, dtype)
        for name, plan in PLANS.items():
            _, grads = loss_and_grads(loss_fn(plan), problem, dtype)
            ratio = worst_ratio(problem, dtype, grads, expected)
            if ratio > worst[name][0]:
                worst[name] = (ratio, problem.describe())
    report = {
        "dtype": args.dtype, "draws": args.draws, "wall_s": time.perf_counter() - start,
        "worst_fraction_of_tolerance": {k: v[0] for k, v in worst.items()},
        "worst_problem": {k: v[1] for k, v in worst.items()},
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0]},
        "command": f"GIST_TEST_SEED={SESSION_SEED} TRITON_INTERPRET=1 .venv/bin/python benchmarks/grad_error_sweep.py "
        f"--dtype {args.dtype} --draws {args.draws}",
        "machine": "CPU (Triton interpreter): accuracy only, no timing",
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"triton_grad_error_{args.dtype}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [
        f"# Worst gradient error of the Triton plans, {args.dtype}, {args.draws} random problems",
        "",
        f"`{report['command']}`; torch {torch.__version__}, triton {triton.__version__}; {report['machine']}.",
        "Fraction of the tests' stated tolerance (1.0 = a test would fail); the worst problem of each plan.",
        "",
        "| plan | worst fraction | worst problem |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {k} | {v[0]:.2f} | {v[1]} |" for k, v in worst.items()]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(json.dumps(report["worst_fraction_of_tolerance"]), f"-> {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
