"""The GPU benchmark script runs end to end (smoke mode: the Triton interpreter, tiny shapes).

Sessions without a GPU prepare `benchmarks/bench_triton_gpu.py` for the one device call of a later
session; this keeps it from rotting in between. It runs the script in a fresh process (it picks
the interpreter before importing Triton) and checks its report: both Triton plans agree with the
torch backend, every stage reported, every method measured (issue 13's Matryoshka losses too, with
their time ratios), and the report marked complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_smoke_run_reports_every_stage(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    script = ROOT / "benchmarks" / "bench_triton_gpu.py"
    proc = subprocess.run(
        # No budget to speak of: on a loaded machine the interpreter's runs would use it up.
        [sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--budget-s", "5000"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "triton_gpu_smoke.json").read_text())
    assert report["complete"] and report["smoke"]
    # Every method against the float64 oracle; the materialised bf16 loss in bf16 only.
    checked = {(c["plan"], c["dtype"]) for c in report["correctness"]}
    plans = ("triton", "triton-chunked", "torch")
    matryoshka_checked = {("triton-chunked-matryoshka", "bfloat16"), ("torch-matryoshka", "bfloat16")}
    bf16_only = {("materialised-bf16", "bfloat16")} | matryoshka_checked
    assert checked == {(p, d) for p in plans for d in ("bfloat16", "float32")} | bf16_only
    assert all(c["pass"] for c in report["correctness"]), [c for c in report["correctness"] if not c["pass"]]
    oracles = {(c["plan"], c["dtype"]): c["oracle"] for c in report["correctness"]}
    assert all(oracles[k] == "sum of single-dim torch losses, float64" for k in matryoshka_checked)
    assert all(v == "torch backend, float64" for k, v in oracles.items() if k not in matryoshka_checked)
    assert any("tflops" in g for g in report["ceilings"]["gemm"])
    assert all(r["tb_per_s"] > 0 for r in report["ceilings"]["read"])
    assert [t.get("error") for t in report["tuning"]] == [None, None]
    measured = {(r["B"], r["method"]) for r in report["rows"] if r["status"] == "ok"}
    methods = {"triton", "triton-chunked", "materialised-bf16", "torch", "reference", "compiled"}
    methods.add("sentence-transformers")
    # Issue 13: the Matryoshka losses, one-pass (Triton chunked plan, torch) and sentence-transformers'.
    methods |= {"triton-chunked-matryoshka", "torch-matryoshka", "sentence-transformers-matryoshka"}
    assert measured == {(b, m) for b in (16, 40) for m in methods}
    matryoshka_rows = [r for r in report["rows"] if r["method"].endswith("-matryoshka")]
    assert all(r["matryoshka_dims"] == [16, 10, 5, 4] and "max m" in r["flop_count"] for r in matryoshka_rows)
    # Each one-pass loss's time over its single-dim method's and over sentence-transformers' Matryoshka loss.
    ratios = {(q["B"], q["method"]): q for q in report["matryoshka_ratios"]}
    assert set(ratios) == {(b, m) for b in (16, 40) for m in ("triton-chunked-matryoshka", "torch-matryoshka")}
    for (batch, method), q in ratios.items():
        single = {"triton-chunked-matryoshka": "triton-chunked", "torch-matryoshka": "torch"}[method]
        times = {r["method"]: r["time_s"] for r in report["rows"] if r["B"] == batch}
        assert q["vs_single"] == pytest.approx(times[method] / times[single])
        assert q["vs_st"] == pytest.approx(times[method] / times["sentence-transformers-matryoshka"])
    # torch.compile's compilation happens in an untimed warm-up call, never in the timed ones.
    compiled = [r for r in report["rows"] if r["method"] == "compiled"]
    assert all(r["warmup_s"] is not None for r in compiled)
    assert all(r["warmup_s"] is None for r in report["rows"] if r["method"] != "compiled" and r["status"] == "ok")
    report_md = (tmp_path / "triton_gpu_smoke.md").read_text()
    assert "## Time and memory" in report_md and "## Matryoshka (issue 13)" in report_md
    assert f"| {ratios[(40, 'torch-matryoshka')]['vs_single']:.2f}x |" in report_md
    assert not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / "triton_gpu_smoke.png").stat().st_size > 10_000  # the time and memory plot

    # --plot-from redraws from reports (the GPU image may lack matplotlib): a second call's rows merge in.
    later = dict(report, rows=[dict(r, B=r["B"] * 64) for r in report["rows"] if r["method"] == "triton"])
    (tmp_path / "later.json").write_text(json.dumps(later))
    merged_png = tmp_path / "merged.png"
    first, second = tmp_path / "triton_gpu_smoke.json", tmp_path / "later.json"
    replot = [sys.executable, str(script), "--plot-from", str(first), str(second)]
    proc = subprocess.run([*replot, "--out", str(merged_png)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and merged_png.stat().st_size > 10_000, proc.stderr[-2000:]
    assert f"({len(report['rows']) + 2} rows from 2 reports)" in proc.stdout  # B = 16, 40 -> 1024, 2560
    (tmp_path / "broken.json").write_text('{"rows": [')
    proc = subprocess.run([*replot[:3], str(tmp_path / "broken.json")], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "broken.json: not a benchmark report" in proc.stderr


def test_materialised_bf16_loss_is_the_gist_loss():
    """The benchmark's yardstick (F.normalize, matmuls, masked_fill, F.cross_entropy) is the GIST
    loss at the benchmark's options: in float64 it equals the reference backend."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from bench_triton_gpu import materialised_bf16_loss
    from problems import draw_problem, rng_for

    import gist_fast

    rng = rng_for("materialised-bf16")
    for batch in (1, 5, 33):
        problem = draw_problem(rng, batch, 12, 20, 1, options={"temperature": 0.05})
        student, guide = problem.args(torch.float64)
        loss = materialised_bf16_loss(student, guide, temperature=0.05)
        grads = torch.autograd.grad(loss, student)
        s, g = problem.args(torch.float64)
        want = gist_fast.gist_loss(s[0], s[1], g[0], g[1], s[2:], g[2:], temperature=0.05, backend="reference")
        want_grads = torch.autograd.grad(want, s)
        assert torch.allclose(loss, want, rtol=1e-10, atol=0), (batch, loss.item(), want.item())
        for got, exp in zip(grads, want_grads, strict=True):
            assert torch.allclose(got, exp, rtol=1e-9, atol=1e-12), batch
