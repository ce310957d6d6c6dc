"""GPU benchmark of the fused Triton GIST loss (issue 3), in one run that fits one device call.

What it does, in order, under one time budget (``--budget-s``, default 500 s):

1. Correctness at a large shape: both plans of ``backend="triton"``, ``backend="torch"`` and (bf16)
   the materialised bf16 loss against a float64 oracle (``backend="torch"``, the tiled PyTorch
   path, on float64 copies of the same inputs: memory-linear, tested equal to the reference to
   1e-9) in bf16 and fp32, B = 16384, d = 768, dg = 1024, one negative column, both contrast
   blocks: loss and every gradient, errors relative to the largest magnitude, the tests'
   tolerances (tests/problems.py). The Triton plans' distance to fp32 ``"torch"`` is recorded too
   (the first GPU run compared with it alone; benchmarks/NOTES.md, "fp32 check").
2. The card's rates at these shapes (benchmarks/gpu_probes.py): cuBLAS bf16 GEMMs of the logit
   and gradient products, and the read rate from L2 and from HBM; they check the model that
   benchmarks/NOTES.md predicted the kernels' speed with.
3. A small sweep of tile shapes for each plan at B = 16384, d = 768 (five for the fused kernels, three
   for the chunked ones); the fastest of each is used from then on and all are recorded. Then one
   forward + backward of each plan at that shape split into its kernels (torch.profiler).
4. Forward + backward time (median of ``triton.testing.do_bench``, or CUDA events around single
   runs when one run takes seconds) and peak memory (``torch.cuda.max_memory_allocated`` above the
   inputs, gradients included) for B in {4096, ..., 1048576}, d in {768, 384, 1024} (768 first:
   the issue's targets are stated for it), dg = 1024, one negative column, both contrast blocks,
   bf16, for:
   - ``triton``: gist_fast's fused kernels (the default plan);
   - ``triton-chunked``: the chunked GEMM-shaped plan (``Chunks``, benchmarks/NOTES.md v3);
   - ``torch``: gist_fast's tiled PyTorch backend;
   - ``reference``: the materialised PyTorch loss (all B x N logits, bf16 upcast to fp32);
   - ``materialised-bf16``: the ten-line PyTorch loss a user would write (``F.normalize``, bf16
     matmuls, fp32 logits, ``masked_fill(-inf)``, ``torch.cat``, ``F.cross_entropy``), issue 10's yardstick;
   - ``compiled``: ``torch.compile(dynamic=True)`` of the materialised loss, compiled in an
     untimed warm-up call first (the first GPU run timed its 69 s compilation);
   - ``sentence-transformers``: its ``GISTEmbedLoss`` on injected embeddings (benchmarks/st_injection.py);
   - issue 13's Matryoshka loss, prefix dims (768, 512, 256, 128, 64) at d = 768 (the same fractions
     of another d): ``triton-chunked-matryoshka`` (backend "triton_chunked"'s one-pass path, the
     chunked plan's tiles), ``torch-matryoshka`` (backend "torch"'s one-pass path) and
     ``sentence-transformers-matryoshka`` (its ``MatryoshkaLoss(GISTEmbedLoss)`` on injected
     embeddings, benchmarks/bench_matryoshka_cpu.py's helper). The report's Matryoshka table gives
     each one-pass loss's time over its single-dim method's at the same B (``triton-chunked``,
     ``torch``; target <= 1.6x) and over sentence-transformers' (target <= 0.5x).
   Out-of-memory is recorded as such (also when the logits alone would not fit: "predicted"); a
   run whose predicted time exceeds the remaining budget is recorded as skipped.

Effective TFLOP/s = 2 B N (3d + dg) / time, N = all candidate columns (4B here): the useful work of
the forward similarities and the two gradient products (benchmarks/NOTES.md). Matryoshka rows count
2 B N (2 dg + 2 max m + 2 sum m) instead: the executed FLOPs of the two-pass one-pass plan in
benchmarks/NOTES.md's Matryoshka section (7040 per 2BN at d = 768 against 5120 for one dim; the
chunked plan itself executes 6080), the same count for every Matryoshka method.

Results go to ``--out`` (default benchmarks/results/): ``triton_gpu_<gpu>.json``, ``.md`` (a table)
and ``.png`` (time and memory against B, one panel row per d), naming the GPU and the versions. The
JSON and markdown are rewritten after every stage and every measured row (``"complete": false``
until the end), so a run killed at a time limit keeps what it measured. The budget covers the tile
sweep too; correctness and the probes always run.

Usage (repo root):
    python3 benchmarks/bench_triton_gpu.py --out "$OUT"   # on a GPU, about 8-9 minutes
    python3 benchmarks/bench_triton_gpu.py --out "$OUT" --dims 768 --batches 1024 4096 16384 65536 --no-tune \
        --methods triton-chunked triton-chunked-matryoshka sentence-transformers-matryoshka --tag matryoshka
    python3 benchmarks/bench_triton_gpu.py --smoke        # CPU, Triton interpreter, tiny shapes: checks the script

If the kernel runs at the rate predicted in benchmarks/NOTES.md, B = 1048576 takes minutes and the
budget records it as skipped; measure it on its own in a second call, with the tiles the first
call tuned (its report copied into the repo first, so that it travels to the device):
    python3 benchmarks/bench_triton_gpu.py --out "$OUT" --dims 768 --batches 1048576 \
        --methods triton triton-chunked --tiles-from benchmarks/results/triton_gpu_<gpu>.json --tag b1048576 \
        --budget-s 560
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

if not torch.cuda.is_available():  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402
from gpu_probes import kernel_breakdown, measure_ceilings  # noqa: E402

from gist_fast.backends.reference import gist_loss_reference  # noqa: E402
from gist_fast.backends.torch_tiled import gist_loss_torch  # noqa: E402
from gist_fast.backends.triton import Blocks, Chunks, gist_loss_triton  # noqa: E402
from gist_fast.backends.triton.fused import default_blocks  # noqa: E402
from gist_fast.inputs import GISTInputs, GISTOptions, validate  # noqa: E402

TEMPERATURE = 0.01
OPTIONS = GISTOptions(temperature=TEMPERATURE, margin=0.0, contrast_anchors=True, contrast_positives=True)
# Issue 13's Matryoshka prefix dims at d = 768 (`matryoshka_dims` scales them to another d).
MATRYOSHKA_DIMS = (768, 512, 256, 128, 64)
# Each Matryoshka method and the single-dim method it is compared with at the same B (the 1x).
MATRYOSHKA_SINGLE = {
    "triton-chunked-matryoshka": "triton-chunked",
    "torch-matryoshka": "torch",
    "sentence-transformers-matryoshka": "sentence-transformers",
}
# The gist-fast one-pass Matryoshka losses (checked against the float64 composition of single dims).
ONE_PASS_MATRYOSHKA = ("triton-chunked-matryoshka", "torch-matryoshka")
METHODS = ["triton", "triton-chunked", "materialised-bf16", "torch", "reference", "compiled", "sentence-transformers",
           *MATRYOSHKA_SINGLE]  # fmt: skip
# Methods whose first call compiles (seconds to minutes): one untimed warm-up call before measuring.
COMPILING_METHODS = ("compiled",)
# The two plans of backend="triton": the fused kernels (the default) and the chunked ones (NOTES.md v3).
TRITON_PLANS = ("triton", "triton-chunked")
# Each configuration costs a compilation of four kernels (tens of seconds): keep the sweep short.
# (owned, streamed, k, warps, stages); the sm_90 builds of the first four spill nothing, the last
# spills up to 96 B (benchmarks/NOTES.md, v2b).
TUNE_CONFIGS = [
    Blocks(64, 128, 32, warps=8, stages=3),
    Blocks(64, 128, 32, warps=8, stages=4),
    Blocks(64, 64, 32, warps=8, stages=3),
    Blocks(64, 128, 64, warps=8, stages=3),
    Blocks(64, 256, 32, warps=8, stages=3),
]
# The chunked plan: default tiles (no spill), taller chunks, and 128 x 128 tiles (spill 48-80 B).
CHUNK_CONFIGS = [
    Chunks(),
    Chunks(rows=16384, columns=4096),
    Chunks(tile_m=128, tile_n=128, tile_k=32),
]
SMOKE_CHUNKS = Chunks(rows=16, columns=24, tile_m=16, tile_n=16, tile_k=16, gemm_m=16, gemm_n=16, gemm_k=16)


# ----------------------------------------------------------------------------------------------
# Problems and methods
# ----------------------------------------------------------------------------------------------


def make_inputs(batch: int, dim: int, guide_dim: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Student (anchor, positive, negative; with grad) and guide tensors, random, one negative."""
    gen = torch.Generator(device=device).manual_seed(seed)
    student = [torch.randn(batch, dim, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(3)]
    guide = [torch.randn(batch, guide_dim, device=device, dtype=dtype, generator=gen) for _ in range(3)]
    return student, guide


def num_columns(batch: int) -> int:
    return 4 * batch  # AP + AA + PP + one AN block


def useful_flops(batch: int, dim: int, guide_dim: int) -> float:
    return 2.0 * batch * num_columns(batch) * (3 * dim + guide_dim)


def matryoshka_dims(dim: int) -> tuple[int, ...]:
    """The Matryoshka prefix dims benchmarked at student width `dim`: issue 13's (768, 512, 256,
    128, 64) at d = 768, the same fractions of d elsewhere (floored, duplicates dropped), none below
    min(d, 4): the smoke run's d = 16 would give prefixes of 2 and 1, where the chunked one-pass
    path's bf16 gradients are off by up to 0.27 of the largest (its summed segment matrix cancels
    a 1-wide prefix's large terms after rounding them to bf16; the per-dim composition: 0.005).

    Example:
        >>> matryoshka_dims(768), matryoshka_dims(16)
        ((768, 512, 256, 128, 64), (16, 10, 5, 4))
    """
    floor = min(dim, 4)
    return tuple(dict.fromkeys(max(floor, dim * m // MATRYOSHKA_DIMS[0]) for m in MATRYOSHKA_DIMS))


def matryoshka_flops(batch: int, dim: int, guide_dim: int) -> float:
    """Executed FLOPs of the two-pass one-pass Matryoshka plan (benchmarks/NOTES.md, "Matryoshka"):
    per logit entry and pass the guide dots (dg), one student sweep up to max m, one gradient
    product per dim (m): 2 B N (2 dg + 2 max m + 2 sum m)."""
    dims = matryoshka_dims(dim)
    return 2.0 * batch * num_columns(batch) * (2 * guide_dim + 2 * max(dims) + 2 * sum(dims))


def row_flops(name: str, batch: int, dim: int, guide_dim: int) -> tuple[float, str]:
    """The FLOP count a row's TFLOP/s divides by, and its name."""
    if name in MATRYOSHKA_SINGLE:
        return matryoshka_flops(batch, dim, guide_dim), "2BN(2dg + 2 max m + 2 sum m), executed, one-pass plan"
    return useful_flops(batch, dim, guide_dim), "2BN(3d + dg), useful"


def _validated(student, guide, dims: tuple[int, ...] | None = None) -> tuple[GISTInputs, GISTOptions]:
    return validate(
        student[0], student[1], guide[0], guide[1], student[2:], guide[2:],
        temperature=OPTIONS.temperature, margin_strategy=OPTIONS.margin_strategy, margin=OPTIONS.margin,
        contrast_anchors=OPTIONS.contrast_anchors, contrast_positives=OPTIONS.contrast_positives,
        reduction=OPTIONS.reduction, check_finite=False, matryoshka_dims=dims,
    )  # fmt: skip


def _materialised(a, p, n, ga, gp, gn):
    return gist_loss_reference(GISTInputs(a, p, (n,), ga, gp, (gn,)), OPTIONS)


def materialised_bf16_loss(student: list[torch.Tensor], guide: list[torch.Tensor], temperature: float = TEMPERATURE):
    """The plain PyTorch GIST loss at this benchmark's options (margin 0, both contrast blocks, one
    negative column, mean), as a user would write it: all B x 4B logits materialised.

    Inputs are normalised in their own dtype (bf16), the student and guide blocks are bf16 matmuls
    whose results are taken to fp32, a candidate is dropped when its guide cosine exceeds the
    anchor-positive one (the AP block's diagonal; the target itself never does), and the loss is
    F.cross_entropy over the concatenated blocks.

    Args:
        student: [anchor, positive, negative], each (B, d).
        guide: the guide's [anchor, positive, negative], each (B, dg).
        temperature: the logits' divisor.

    Example:
        >>> s = [torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        >>> g = [torch.randn(8, 32, dtype=torch.bfloat16) for _ in range(3)]
        >>> materialised_bf16_loss(s, g).backward()
    """
    import torch.nn.functional as F

    a, p, n = (F.normalize(t, dim=-1) for t in student)
    ga, gp, gn = (F.normalize(t, dim=-1) for t in guide)
    wide = torch.promote_types(a.dtype, torch.float32)  # fp32 logits (float64 stays float64)
    pairs = ((a, p, ga, gp), (a, a, ga, ga), (p, p, gp, gp), (a, n, ga, gn))  # AP, AA, PP, AN
    guide_ap = (ga @ gp.T).to(wide)
    threshold = guide_ap.diagonal().unsqueeze(1)
    logits = []
    for x, y, gx, gy in pairs:
        g = guide_ap if gx is ga and gy is gp else (gx @ gy.T).to(wide)
        logits.append((x @ y.T).to(wide).masked_fill(g > threshold, float("-inf")))
    z = torch.cat(logits, dim=1) / temperature
    return F.cross_entropy(z, torch.arange(z.shape[0], device=z.device))


_compiled_materialised = None


def method_fn(name: str, plans: dict[str, Blocks | Chunks]):
    """loss(student, guide) -> scalar, for each compared method (`plans`: the tiles of each Triton plan)."""
    global _compiled_materialised
    if name in TRITON_PLANS:
        return lambda s, g: gist_loss_triton(*_validated(s, g), blocks=plans[name])
    if name == "torch":
        return lambda s, g: gist_loss_torch(*_validated(s, g))
    if name == "reference":
        return lambda s, g: gist_loss_reference(*_validated(s, g))
    if name == "materialised-bf16":
        return lambda s, g: materialised_bf16_loss(s, g)
    if name == "compiled":
        if _compiled_materialised is None:
            _compiled_materialised = torch.compile(_materialised, dynamic=True)
        return lambda s, g: _compiled_materialised(*s, *g)
    if name == "sentence-transformers":
        from st_injection import make_st_gist_loss, st_gist_loss

        loss = make_st_gist_loss(temperature=TEMPERATURE, margin=0.0, contrast_anchors=True, contrast_positives=True)
        return lambda s, g: st_gist_loss(s[0], s[1], g[0], g[1], s[2], g[2], loss=loss)
    if name == "triton-chunked-matryoshka":  # Chunks tiles: the chunked plan's one-pass path
        chunks = plans["triton-chunked"]
        return lambda s, g: gist_loss_triton(*_validated(s, g, matryoshka_dims(s[0].shape[1])), blocks=chunks)
    if name == "torch-matryoshka":
        return lambda s, g: gist_loss_torch(*_validated(s, g, matryoshka_dims(s[0].shape[1])))
    if name == "sentence-transformers-matryoshka":
        from bench_matryoshka_cpu import st_matryoshka

        return lambda s, g: st_matryoshka(s, g, dims=matryoshka_dims(s[0].shape[1]), temperature=TEMPERATURE)
    raise ValueError(name)


def min_bytes(name: str, batch: int, dim: int) -> float:
    """A lower bound on the extra memory a method needs (the materialised logits), for OOM prediction."""
    if name == "materialised-bf16":
        # The masked blocks, their concatenation and the scaled logits (saved for backward) are
        # three fp32 B x N tensors at once: 56 GiB measured at B = 32768 on 2026-11-29.
        return 3 * 4.0 * batch * num_columns(batch)
    if name in ("reference", "compiled"):
        return 4.0 * batch * num_columns(batch)  # fp32 logits
    if name in ("sentence-transformers", "sentence-transformers-matryoshka"):
        return 2.0 * batch * batch * dim  # one broadcast B x B x d product in bf16
    return 0.0


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def measure(fn, student, guide, predicted_s: float | None, deadline: float = math.inf, warmup: bool = False) -> dict:
    """Median fwd+bwd seconds and peak bytes above what was allocated before (inputs).

    `warmup`: call `fn` once, untimed, first (a method that compiles on its first call: its
    compilation must not be timed); its seconds are reported as "warmup_s"."""

    def step():
        for t in student:
            t.grad = None
        fn(student, guide).backward()

    on_gpu = torch.cuda.is_available()
    warmup_s = None
    if warmup:
        start = time.perf_counter()
        step()
        _sync()
        warmup_s = time.perf_counter() - start
    for t in student:
        t.grad = None
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    long_run = predicted_s is not None and predicted_s > 2.0
    start = time.perf_counter()
    if on_gpu:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    fn(student, guide).backward()  # the first run: memory, and the warm-up (compilation)
    if on_gpu:
        end.record()
    _sync()
    first_s = begin.elapsed_time(end) / 1e3 if on_gpu else time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if on_gpu else None
    if long_run or first_s > 2.0:
        # One run takes seconds: a single run is the measurement. Without a prediction the first run
        # may have included compilation, so time a second one when the budget allows.
        if predicted_s is None and time.perf_counter() + 1.5 * first_s < deadline:
            for t in student:
                t.grad = None
            start = time.perf_counter()
            fn(student, guide).backward()
            _sync()
            first_s = time.perf_counter() - start
        return {"time_s": first_s, "peak_bytes": peak, "timing": "single run", "warmup_s": warmup_s}
    if on_gpu:
        ms = triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
        return {"time_s": ms / 1e3, "peak_bytes": peak, "timing": "do_bench median", "warmup_s": warmup_s}
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    timing = "CPU wall clock, median of 3"
    return {"time_s": sorted(times)[1], "peak_bytes": None, "timing": timing, "warmup_s": warmup_s}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


# Tolerances relative to the largest magnitude of the compared tensor (tests/problems.py's TOLERANCES;
# the loss at 1e-4 in bf16: the materialised bf16 loss rounds its logits' inputs to bf16).
CHECK_TOLERANCES = {
    torch.bfloat16: {"loss": 1e-4, "grad": 1.6e-2},
    torch.float32: {"loss": 2e-5, "grad": 1e-4},
}
# The materialised bf16 loss is the speed yardstick, written as a user would: its bf16 matmuls
# round each cosine to 8 bits before the fp32 cast, a logit error up to 2^-9 / tau (0.2 at
# tau = 0.01), so softmax weights up to ~20 % off: checked here for gross errors only (its
# definition is checked in float64 by tests/test_gpu_benchmark_script.py).
YARDSTICK_TOLERANCE = {"loss": 1e-2, "grad": 0.25}


def _loss_and_grads(fn, student, guide):
    for t in student:
        t.grad = None
    loss = fn(student, guide)
    loss.backward()
    out = (loss.detach(), [t.grad.clone() for t in student])
    for t in student:
        t.grad = None
    return out


def check_correctness(batch: int, dim: int, guide_dim: int, device: str, plans: dict) -> list[dict]:
    """Each method against a float64 oracle on the same inputs, bf16 and fp32.

    The oracle is backend "torch" (tiled, memory-linear; tested equal to the reference to 1e-9) on
    float64 copies of the inputs, on the same device: float64 matmuls round nothing that matters
    here and take no TF32 path. Each row records the method's error against it, and for the Triton
    plans also the distance to fp32/bf16 "torch" (what the first GPU run compared with)."""
    rows = []
    for dtype, tol in CHECK_TOLERANCES.items():
        student, guide = make_inputs(batch, dim, guide_dim, dtype, device, seed=1)
        wide = [t.detach().double().requires_grad_() for t in student], [t.double() for t in guide]
        l_64, g_64 = _loss_and_grads(lambda s, g: gist_loss_torch(*_validated(s, g)), *wide)
        del wide
        names = [*TRITON_PLANS, "torch"] + (["materialised-bf16"] if dtype == torch.bfloat16 else [])
        results = {name: _loss_and_grads(method_fn(name, plans), student, guide) for name in names}
        for name in names:
            loss, grads = results[name]
            loss_err = _rel_err(loss, l_64)
            grad_errs = [_rel_err(a, b) for a, b in zip(grads, g_64, strict=True)]
            row_tol = YARDSTICK_TOLERANCE if name == "materialised-bf16" else tol
            ok = loss_err <= row_tol["loss"] and max(grad_errs) <= row_tol["grad"]
            row = {
                "plan": name, "dtype": str(dtype).removeprefix("torch."), "B": batch, "d": dim, "dg": guide_dim,
                "oracle": "torch backend, float64", "loss": loss.item(), "loss_float64": l_64.item(),
                "loss_rel_err": loss_err, "grad_rel_err": grad_errs, "tolerance": row_tol, "pass": ok,
            }  # fmt: skip
            if name in TRITON_PLANS:
                row["grad_rel_diff_to_torch"] = [
                    _rel_err(a, b) for a, b in zip(grads, results["torch"][1], strict=True)
                ]
            print(f"[check] {row}", flush=True)
            rows.append(row)
        del student, guide, results, g_64
    return rows


def check_matryoshka(
    batch: int, dim: int, guide_dim: int, device: str, plans: dict, methods: tuple[str, ...]
) -> list[dict]:
    """`methods` (one-pass Matryoshka losses, ONE_PASS_MATRYOSHKA) in bf16 against the float64 sum
    of single-dim "torch" losses on the truncated inputs (the definition, not a one-pass path), at
    the plain check's bf16 tolerances. bf16 only: the sweep's dtype, and each dtype costs the GPU a
    compilation of the Matryoshka kernels (the interpreter tests cover fp32 and fp16)."""
    from gist_fast.backends.matryoshka import compose_per_dimension

    dims, tol = matryoshka_dims(dim), CHECK_TOLERANCES[torch.bfloat16]
    student, guide = make_inputs(batch, dim, guide_dim, torch.bfloat16, device, seed=2)
    wide = [t.detach().double().requires_grad_() for t in student], [t.double() for t in guide]
    oracle = lambda s, g: compose_per_dimension(gist_loss_torch, *_validated(s, g, dims))  # noqa: E731
    l_64, g_64 = _loss_and_grads(oracle, *wide)
    del wide
    rows = []
    for name in methods:
        loss, grads = _loss_and_grads(method_fn(name, plans), student, guide)
        loss_err = _rel_err(loss, l_64)
        grad_errs = [_rel_err(a, b) for a, b in zip(grads, g_64, strict=True)]
        row = {
            "plan": name, "dtype": "bfloat16", "B": batch, "d": dim, "dg": guide_dim, "matryoshka_dims": list(dims),
            "oracle": "sum of single-dim torch losses, float64", "loss": loss.item(), "loss_float64": l_64.item(),
            "loss_rel_err": loss_err, "grad_rel_err": grad_errs, "tolerance": tol,
            "pass": loss_err <= tol["loss"] and max(grad_errs) <= tol["grad"],
        }  # fmt: skip
        print(f"[check] {row}", flush=True)
        rows.append(row)
    return rows


def compiled_resources() -> dict[str, list[str]]:
    """Registers and spills of every kernel build Triton's JIT holds so far (the GPU's own build,
    to set beside the offline report of gist_fast.backends.triton.compile_check)."""
    from gist_fast.backends.triton import chunked_kernels, fused_kernels

    found: dict[str, list[str]] = {}
    kernels = {
        "row_pass_kernel": fused_kernels.row_pass_kernel,
        "column_pass_kernel": fused_kernels.column_pass_kernel,
        "tile_kernel": chunked_kernels.tile_kernel,
        "scaled_gemm_kernel": chunked_kernels.scaled_gemm_kernel,
        "chunk_stats_kernel": chunked_kernels.chunk_stats_kernel,
    }
    for name, kernel in kernels.items():
        try:
            for cache in kernel.device_caches.values():
                for compiled in cache[0].values():
                    compiled._init_handles()
                    found.setdefault(name, []).append(f"regs {compiled.n_regs} spills {compiled.n_spills}")
        except Exception as err:  # private API: record, never fail the benchmark over it
            found[name] = [f"unavailable: {type(err).__name__}: {err}"[:200]]
    return found


def tune(
    batch: int, dim: int, guide_dim: int, device: str, plan: str, configs: list, deadline: float = math.inf
) -> tuple[object, list[dict]]:
    """Time each tile configuration of one Triton plan once at one shape; return the fastest.

    A configuration costs a compilation (tens of seconds on a GPU): those left when `deadline`
    (perf_counter seconds) is under a minute away are recorded as skipped."""
    student, guide = make_inputs(batch, dim, guide_dim, torch.bfloat16, device)
    rows, best = [], None
    for config in configs:
        if best is not None and deadline - time.perf_counter() < 60:
            rows.append({"plan": plan, "tiles": asdict(config), "error": "skipped: time budget"})
            print(f"[tune] {rows[-1]}", flush=True)
            continue
        try:
            r = measure(method_fn(plan, {plan: config}), student, guide, None)
            row = {"plan": plan, "tiles": asdict(config), "time_s": r["time_s"], "builds_so_far": compiled_resources()}
            if best is None or r["time_s"] < best[1]:
                best = (config, r["time_s"])
        except Exception as err:  # a config that does not compile or fit is recorded and skipped
            row = {"plan": plan, "tiles": asdict(config), "error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(f"[tune] {row}", flush=True)
        rows.append(row)
    return (best[0] if best else configs[0]), rows


def tiles_from(path: Path) -> dict[str, Blocks | Chunks]:
    """The tiles a previous report used for each Triton plan (its "plans": the tuned ones)."""
    try:
        saved = json.loads(path.read_text())["plans"]
        return {"triton": Blocks(**saved["triton"]), "triton-chunked": Chunks(**saved["triton-chunked"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--tiles-from {path}: no usable 'plans' in it ({type(err).__name__}: {err})") from err


def _probe(fn, *args, **kwargs) -> dict:
    """A calibration probe's result, or {"error": ...}: a probe never stops the benchmark."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        print(f"[probe] {fn.__name__} failed: {type(err).__name__}: {err}", flush=True)
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}


def breakdowns(shape: tuple[int, int, int], device: str, plans: dict) -> dict[str, list[dict]]:
    """Each Triton plan's forward + backward at `shape` (B, d, dg), split into its kernels."""
    student, guide = make_inputs(*shape, torch.bfloat16, device)
    found = {}
    for name in TRITON_PLANS:
        fn = method_fn(name, plans)
        found[name] = kernel_breakdown(lambda fn=fn: fn(student, guide).backward(), device)
        for t in student:
            t.grad = None
    return found


def run_sweep(args, plans: dict, deadline: float, device: str, rows: list, on_row=lambda: None) -> list[dict]:
    """Every (d, B, method) of the sweep, appended to `rows` as measured; `on_row` after each one."""
    total_memory = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else math.inf
    for dim in args.dims:
        rate: dict[str, float] = {}  # last effective FLOP/s per method at this d
        failed: dict[str, str] = {}
        for batch in args.batches:
            try:
                student, guide = make_inputs(batch, dim, args.guide_dim, torch.bfloat16, device)
            except Exception as err:
                rows.append({"d": dim, "B": batch, "method": "inputs", "status": f"error: {err}"})
                continue
            input_bytes = sum(t.numel() * t.element_size() for t in student + guide)
            grad_bytes = sum(t.numel() * t.element_size() for t in student)
            for name in args.methods:
                flops, flop_count = row_flops(name, batch, dim, args.guide_dim)
                row = {"d": dim, "dg": args.guide_dim, "B": batch, "N": num_columns(batch), "method": name,
                       "input_bytes": input_bytes, "grad_bytes": grad_bytes, "useful_flops": flops,
                       "flop_count": flop_count}  # fmt: skip
                if name in MATRYOSHKA_SINGLE:
                    row["matryoshka_dims"] = list(matryoshka_dims(dim))
                predicted = flops / rate[name] * 1.3 if name in rate else None
                remaining = deadline - time.perf_counter()
                if name in failed:
                    row["status"] = f"skipped: {failed[name]} at a smaller B"
                elif min_bytes(name, batch, dim) + input_bytes > total_memory:
                    need = min_bytes(name, batch, dim) / 2**30
                    row["status"] = f"oom (predicted: needs at least {need:.0f} GiB beyond the inputs)"
                elif predicted is not None and predicted > remaining:
                    row["status"] = f"skipped: predicted {predicted:.0f} s > {remaining:.0f} s left of the budget"
                elif remaining < 5:
                    row["status"] = "skipped: time budget spent"
                else:
                    try:
                        fn = method_fn(name, plans)
                        warm = name in COMPILING_METHODS
                        row.update(measure(fn, student, guide, predicted, deadline, warmup=warm))
                        row["status"] = "ok"
                        row["tflops"] = flops / row["time_s"] / 1e12
                        rate[name] = flops / row["time_s"]
                        if row["peak_bytes"] is not None:
                            row["peak_over_inputs_and_grads"] = (input_bytes + row["peak_bytes"]) / (
                                input_bytes + grad_bytes
                            )
                    except Exception as err:
                        row["status"] = "oom" if _is_oom(err) else f"error: {type(err).__name__}: {str(err)[:300]}"
                        failed[name] = "oom" if _is_oom(err) else "error"
                    finally:
                        for t in student:
                            t.grad = None
                        if device == "cuda":
                            torch.cuda.empty_cache()
                print(f"[bench] {_row_text(row)}", flush=True)
                rows.append(row)
                on_row()
            del student, guide
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def _row_text(row: dict) -> str:
    if row.get("status") != "ok":
        return f"d={row['d']} B={row['B']} {row['method']}: {row.get('status')}"
    mem = "" if row["peak_bytes"] is None else f", peak +{row['peak_bytes'] / 2**30:.2f} GiB"
    return f"d={row['d']} B={row['B']} {row['method']}: {row['time_s'] * 1e3:.2f} ms, {row['tflops']:.1f} TFLOP/s{mem}"


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


def environment(device: str) -> dict:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    env = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or 'unknown'})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "sentence_transformers": version("sentence-transformers"),
        "python": platform.python_version(),
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        # What fp32 matmuls of the "torch" methods may round to (TF32 when "high" / allowed).
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        # Variables that switch cuBLAS fp32 matmuls to TF32 behind torch's flags (NGC-style images).
        "tf32_environment": {
            k: os.environ[k] for k in ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "NVIDIA_TF32_OVERRIDE") if k in os.environ
        },
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    return env


def markdown(report: dict) -> str:
    env = report["environment"]
    guide_dim = report["rows"][0]["dg"] if report["rows"] else "?"
    lines = [
        f"# Triton GIST loss benchmark: {env['device']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"sentence-transformers {env['sentence_transformers']}, {env['date_utc']} UTC"
        + (" — **Triton interpreter on the CPU (smoke run, not a measurement)**" if env["interpreter"] else ""),
        "",
        f"Forward + backward, bf16, dg = {guide_dim}, one negative column, both contrast blocks (N = 4B), "
        "temperature 0.01. Effective TFLOP/s = 2·B·N·(3d + dg) / time (Matryoshka rows: see their section). "
        "Peak = max_memory_allocated "
        "above the inputs (gradients included); ratio = (inputs + peak) / (inputs + gradients).",
        f"Tiles: {report['plans']}.",
        "",
        "## Correctness (each method against a float64 oracle, same inputs)",
        "",
        "| method | dtype | B | loss rel. err | max grad rel. err | tolerance (grad) | pass | grad diff to torch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in report["correctness"]:
        if "oracle" in c:
            errs = f"{c['loss_rel_err']:.2e} | {max(c['grad_rel_err']):.2e}"
            to_torch = f"{max(c['grad_rel_diff_to_torch']):.2e}" if "grad_rel_diff_to_torch" in c else ""
        else:  # reports before 2026-11-30 compared with fp32/bf16 "torch" only
            errs, to_torch = "| ", f"{max(c['grad_rel_err']):.2e} (loss {c['loss_rel_err']:.2e})"
        tolerance = f"{c['tolerance']['grad']:g}"
        lines.append(f"| {c['plan']} | {c['dtype']} | {c['B']} | {errs} | {tolerance} | {c['pass']} | {to_torch} |")
    lines += _ceilings_markdown(report.get("ceilings") or {})
    for plan, kernels in (report.get("breakdown") or {}).items():
        if plan == "error":
            lines += ["", f"Kernel breakdown failed: {kernels}"]
        elif kernels:
            lines += ["", f"## Kernels of one {plan} forward + backward (B, d, dg of the tile sweep)", "",
                      "| kernel | calls | ms | share |", "| --- | --- | --- | --- |"]  # fmt: skip
            lines += [f"| `{k['kernel']}` | {k['calls']} | {k['ms']:.2f} | {k['share']:.1%} |" for k in kernels]
    if not report.get("complete", True):
        lines += ["", "**Incomplete: the run stopped before the end of the sweep.**"]
    lines += ["", "## Time and memory", "", "| d | B | method | time (ms) | TFLOP/s | peak (GiB) | ratio | status |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in report["rows"]:
        if r.get("status") == "ok":
            peak = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
            ratio = f"{r['peak_over_inputs_and_grads']:.2f}" if "peak_over_inputs_and_grads" in r else ""
            lines.append(
                f"| {r['d']} | {r['B']} | {r['method']} | {r['time_s'] * 1e3:.2f} | {r['tflops']:.1f} | {peak} | "
                f"{ratio} | ok |"
            )
        else:
            lines.append(f"| {r['d']} | {r['B']} | {r['method']} | | | | | {r.get('status')} |")
    lines += _matryoshka_markdown(report["rows"])
    return "\n".join(lines) + "\n"


def matryoshka_ratios(rows: list[dict]) -> list[dict]:
    """Per (d, B) and one-pass Matryoshka method measured: its time over its single-dim method's
    (MATRYOSHKA_SINGLE) and over sentence-transformers' MatryoshkaLoss's at the same d and B (None
    where that one has no time: out of memory, skipped, not run)."""
    timed = {(r["d"], r["B"], r["method"]): r["time_s"] for r in rows if r.get("status") == "ok"}
    out = []
    for r in rows:
        if r["method"] not in ONE_PASS_MATRYOSHKA:
            continue
        key = (r["d"], r["B"])
        mine = timed.get((*key, r["method"]))
        single = timed.get((*key, MATRYOSHKA_SINGLE[r["method"]]))
        st = timed.get((*key, "sentence-transformers-matryoshka"))
        out.append({
            "d": r["d"], "B": r["B"], "method": r["method"], "single": MATRYOSHKA_SINGLE[r["method"]],
            "time_s": mine, "single_time_s": single, "st_time_s": st,
            "vs_single": mine / single if mine and single else None, "vs_st": mine / st if mine and st else None,
        })  # fmt: skip
    return out


def _matryoshka_markdown(rows: list[dict]) -> list[str]:
    ratios = matryoshka_ratios(rows)
    if not ratios:
        return []
    status = {(r["d"], r["B"], r["method"]): r.get("status") for r in rows}
    dims = {r["d"]: r["matryoshka_dims"] for r in rows if "matryoshka_dims" in r}

    def cell(seconds, key):
        if seconds is not None:
            return f"{seconds * 1e3:.2f}"
        return status.get(key) or "not run"

    lines = [
        "", "## Matryoshka (issue 13): several prefix dims in one pass against one dim",
        "",
        f"Prefix dims: {'; '.join(f'd = {d}: {tuple(m)}' for d, m in sorted(dims.items()))}, weights 1; "
        "otherwise the shapes above. The TFLOP/s of the Matryoshka rows above count 2·B·N·(2dg + 2·max m + "
        "2·Σm): the executed FLOPs of the two-pass one-pass plan (benchmarks/NOTES.md, Matryoshka; 7040 per "
        "2BN at d = 768 against 5120 for one dim, 1.375x; the chunked plan executes 6080, 1.19x). Targets: "
        "all dims / single dim <= 1.6x, all dims / sentence-transformers' MatryoshkaLoss <= 0.5x.",
        "",
        "| d | B | method | time (ms) | single dim | its time (ms) | all dims / single | "
        "sentence-transformers Matryoshka (ms) | all dims / theirs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for q in ratios:
        key = (q["d"], q["B"])
        ratio = lambda x: "" if x is None else f"{x:.2f}x"  # noqa: E731
        lines.append(
            f"| {q['d']} | {q['B']} | {q['method']} | {cell(q['time_s'], (*key, q['method']))} | {q['single']} | "
            f"{cell(q['single_time_s'], (*key, q['single']))} | {ratio(q['vs_single'])} | "
            f"{cell(q['st_time_s'], (*key, 'sentence-transformers-matryoshka'))} | {ratio(q['vs_st'])} |"
        )
    return lines


def _ceilings_markdown(ceilings: dict) -> list[str]:
    if not ceilings:
        return []
    if "error" in ceilings:
        return ["", f"Rate probes failed: {ceilings['error']}"]
    lines = ["", "## The card's rates at these shapes (benchmarks/gpu_probes.py)", "",
             "| probe | shape | rate |", "| --- | --- | --- |"]  # fmt: skip
    for g in ceilings.get("gemm", []):
        rate = f"{g['tflops']:.0f} TFLOP/s" if "tflops" in g else g.get("error", "")[:60]
        lines.append(f"| torch.mm bf16, {g['out']} out | {g['m']} x {g['k']} @ {g['k']} x {g['n']} | {rate} |")
    for r in ceilings.get("read", []):
        lines.append(f"| read kernel | {r['buffer_mib']:.0f} MiB x {r['reps']} | {r['tb_per_s']:.2f} TB/s |")
    return lines


def plot(report: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    dims = sorted({r["d"] for r in report["rows"]})
    fig, axes = plt.subplots(len(dims), 2, figsize=(11, 3.6 * len(dims)), squeeze=False)
    for row_axes, dim in zip(axes, dims, strict=True):
        for name in METHODS:
            pts = [r for r in report["rows"] if r["d"] == dim and r["method"] == name and r.get("status") == "ok"]
            if not pts:
                continue
            row_axes[0].plot([r["B"] for r in pts], [r["time_s"] for r in pts], marker="o", label=name)
            if pts[0]["peak_bytes"] is not None:
                row_axes[1].plot([r["B"] for r in pts], [r["peak_bytes"] / 2**30 for r in pts], marker="o", label=name)
        for ax, what in zip(row_axes, ("fwd+bwd time (s)", "peak memory above inputs (GiB)"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch B")
            ax.set_ylabel(what)
            guide_dim = next(r["dg"] for r in report["rows"] if r["d"] == dim)
            ax.set_title(f"d = {dim}, dg = {guide_dim}, bf16")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "not measured (needs CUDA)", ha="center", transform=ax.transAxes)
    env = report["environment"]
    fig.suptitle(
        f"GIST loss forward + backward, {env['device']}, torch {env.get('torch', '?')}, "
        f"triton {env.get('triton', '?')}\nmissing points: out of memory or skipped (see the table)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def replot(reports: list[Path], out: Path) -> int:
    """Draw one PNG from the rows of earlier reports (a later report's row replaces an earlier one's
    for the same method and shape), next to the first report unless `out` is a .png path."""
    merged: dict = {}
    rows: dict = {}
    for path in reports:
        try:
            report = json.loads(path.read_text())
            new_rows = report["rows"]
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: --plot-from {path}: not a benchmark report ({exc})", file=sys.stderr)
            return 2
        merged = merged or report
        rows.update({(r["method"], r["B"], r["d"], r["dg"]): r for r in new_rows})
    merged = {**merged, "rows": sorted(rows.values(), key=lambda r: (r["d"], r["method"], r["B"]))}
    path = out if out.suffix == ".png" else reports[0].with_suffix(".png")
    note = plot(merged, path)
    print(note or f"[done] {path} ({len(rows)} rows from {len(reports)} reports)")
    return 1 if note else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter): checks the script runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--budget-s", type=float, default=500.0, help="wall-clock budget of the whole run")
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384, 32768, 65536, 262144, 1048576])
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 384, 1024])
    parser.add_argument("--guide-dim", type=int, default=1024)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--no-tune", action="store_true", help="skip the tile sweep, use the default tiles")
    parser.add_argument("--tag", default="", help="appended to the report's file names (a second run's)")
    parser.add_argument(
        "--tiles-from", type=Path, help="a previous run's JSON report: use its (tuned) tiles, skip the sweep"
    )
    parser.add_argument(
        "--plot-from", type=Path, nargs="+", metavar="JSON",
        help="only draw the PNG from reports already measured (merged; e.g. on a machine with matplotlib)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.plot_from:
        return replot(args.plot_from, args.out)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.batches, args.dims, args.guide_dim = [16, 40], [16], 24
        check_shape, tune_shape = (24, 16, 24), (24, 16, 24)
        configs = {"triton": [default_blocks()], "triton-chunked": [SMOKE_CHUNKS]}
    else:
        if device != "cuda":
            parser.error("no GPU: run with --smoke to check the script on the CPU")
        check_shape, tune_shape = (16384, 768, 1024), (16384, 768, 1024)
        configs = {"triton": TUNE_CONFIGS, "triton-chunked": CHUNK_CONFIGS}
    deadline = start + args.budget_s

    env = environment(device)
    print(f"[env] {env}", flush=True)
    plans = {name: options[0] for name, options in configs.items()}
    if args.tiles_from is not None:
        plans.update(tiles_from(args.tiles_from))
        args.no_tune = True
    report = {"environment": env, "plans": {k: asdict(v) for k, v in plans.items()}, "correctness": [],
              "ceilings": {}, "tuning": [], "breakdown": {}, "rows": [], "wall_s": 0.0, "smoke": args.smoke,
              "complete": False}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "smoke" if args.smoke else env["device"].lower().replace(" ", "-").replace("/", "-")
    stem = args.out / (f"triton_gpu_{slug}" + (f"_{args.tag}" if args.tag else ""))

    def save() -> None:
        # After every stage and every measured row: a run killed at the device's time limit keeps
        # what it measured. Written aside, then renamed: a file is never left half-written.
        report["wall_s"] = time.perf_counter() - start
        report["matryoshka_ratios"] = matryoshka_ratios(report["rows"])
        for suffix, text in ((".json", json.dumps(report, indent=1)), (".md", markdown(report))):
            tmp = stem.with_suffix(suffix + ".tmp")
            tmp.write_text(text)
            tmp.replace(stem.with_suffix(suffix))

    report["correctness"] = check_correctness(*check_shape, device, plans)
    one_pass = tuple(m for m in args.methods if m in ONE_PASS_MATRYOSHKA)
    if one_pass:
        report["correctness"] += check_matryoshka(*check_shape, device, plans, one_pass)
    save()
    report["ceilings"] = _probe(measure_ceilings, device, dims=(check_shape[1], check_shape[2]), smoke=args.smoke)
    save()
    if not args.no_tune:
        for name, options in configs.items():
            plans[name], rows = tune(*tune_shape, device, name, options, deadline)
            report["tuning"] += rows
            save()
    report["plans"] = {k: asdict(v) for k, v in plans.items()}
    print(f"[tiles] using {plans}", flush=True)
    report["breakdown"] = _probe(breakdowns, tune_shape, device, plans)
    save()
    run_sweep(args, plans, deadline, device, report["rows"], on_row=save)
    report["complete"] = True
    save()
    note = plot(report, stem.with_suffix(".png"))
    print(f"[done] {stem}.json/.md" + (f" ({note})" if note else "/.png") + f" in {report['wall_s']:.0f} s")
    return 0 if all(c["pass"] for c in report["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
