"""The GPU training benchmark runs end to end (smoke mode: CPU, tiny models and batches, seconds).

Sessions without a GPU prepare `benchmarks/bench_train_gpu.py` for a later session's device call;
this keeps it from rotting in between: both sides measured at every batch, gist-fast's step split
read from the trainer's metrics log, the ratios and the fit search reported, the report complete;
and a run that would not fit the budget is recorded as skipped instead of run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_train_gpu.py"


def test_train_benchmark_smoke_run_reports_both_sides(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("train_gpu_smoke-*.json")
    assert "_torch" in path.name and "_st" in path.name  # named for the device and the versions
    report = json.loads(path.read_text())
    assert report["complete"] and report["smoke"]
    main = [r for r in report["rows"] if not r["fit"]]
    assert {(r["side"], r["batch"]) for r in main} == {
        (s, b) for s in ("gist-fast", "sentence-transformers") for b in (16, 32)
    }
    assert all(r["status"] == "ok" for r in main), [r["status"] for r in main]
    for r in main:
        assert r["first_epoch_samples_per_s"] > 0 and r["warm_samples_per_s"] > 0
        assert r["epoch"] == [0, 1] and all(math.isfinite(x) for x in r.get("losses", [0.0]))
    ours = [r for r in main if r["side"] == "gist-fast"]
    for r in ours:
        assert set(r["split_s"]) == {"tokenize", "encode", "loss", "reencode", "other"}
        assert 0 < r["loss_share"] < 1 and r["guide_cache_s"] > 0
    for r in main:
        if r["side"] == "sentence-transformers":  # their three steps, timed from outside
            assert set(r["split_s"]) == {"encode", "loss", "reencode", "other"} and len(r["epoch_s"]) == 2
            assert r["split_s"]["encode"] > 0 and r["split_s"]["reencode"] > 0 and 0 < r["loss_share"] < 1
    assert [x["batch"] for x in report["ratios"]] == [16, 32]
    assert report["largest_fit"] == {"gist-fast": 64, "sentence-transformers": 64}
    assert report["tokens"]["positive"]["mean"] > report["tokens"]["anchor"]["mean"]
    md = path.with_suffix(".md").read_text()
    assert "| gist-fast | 64 (fit) | ok |" in md and "warm: gist-fast / ST" in md
    assert not list(tmp_path.glob("*.tmp"))


def test_a_run_that_would_not_fit_the_budget_is_skipped(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train_gpu as bench

    calls = []
    bench.RUNNERS["gist-fast"], real = (lambda *a, **k: calls.append(1) or {}), bench.RUNNERS["gist-fast"]
    try:
        report = {"rows": [{"side": "gist-fast", "batch": 4096, "status": "ok", "wall_s": 10.0}]}
        ctx = {"device": "cpu", "guide": "g", "fit_guide": "g1", "steps_per_epoch": 1}
        row = bench.measure(
            ctx, report, "gist-fast", 65536, fit=False, deadline=time.monotonic() + 100, work_root=tmp_path
        )
        assert row["status"].startswith("skipped: predicted 160 s") and calls == []
        row = bench.measure(
            ctx, report, "gist-fast", 8192, fit=False, deadline=time.monotonic() + 100, work_root=tmp_path
        )
        assert row["status"] == "ok" and calls == [1]
    finally:
        bench.RUNNERS["gist-fast"] = real
