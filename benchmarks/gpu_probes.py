"""Probes that calibrate the Triton benchmark on the card it runs on (benchmarks/NOTES.md's model).

NOTES.md predicts the kernels' speed from three rates it has never measured on this card: the
dense bf16 GEMM rate at this problem's shapes, the HBM bandwidth, and the rate at which the L2
cache feeds the SMs (the "L2-feed model, 6-8 TB/s"). `measure_ceilings` measures all three in a few
seconds, so one device call both times the kernels and checks the model they were predicted with;
`kernel_breakdown` splits one forward + backward into its kernels (the fused plan's two passes, the
chunked plan's tile kernels, GEMMs and per-chunk torch ops) with the profiler.

Both run on the CPU too (tiny sizes, Triton interpreter) so that `bench_triton_gpu.py --smoke`
exercises them; CPU figures mean nothing.

Example:
    >>> from gpu_probes import measure_ceilings
    >>> ceilings = measure_ceilings("cpu", smoke=True)   # {"gemm": [...], "read": [...]}
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import triton
import triton.language as tl
import triton.testing


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, reps, BLOCK: tl.constexpr):
    """Each program sums a strided share of x[:n], `reps` times over: reads n * reps elements."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(reps):
        for start in range(pid * BLOCK, n, step):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def _median_s(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def _read_rate(numel: int, reps: int, device: str) -> dict:
    """Bytes per second read by `_read_kernel` from a bf16 buffer of `numel` elements."""
    x = torch.randn(numel, device=device, dtype=torch.bfloat16)
    programs = 4 * torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 2
    out = torch.empty(programs, device=device, dtype=torch.float32)
    block = 4096 if device == "cuda" else 64
    seconds = _median_s(lambda: _read_kernel[(programs,)](x, out, numel, reps, BLOCK=block), device)
    want = x.sum(dtype=torch.float32).item() * reps
    assert abs(out.sum().item() - want) <= 1e-3 * (abs(want) + x.numel()), "read kernel summed wrongly"
    nbytes = 2.0 * numel * reps
    return {"buffer_mib": 2 * numel / 2**20, "reps": reps, "seconds": seconds, "tb_per_s": nbytes / seconds / 1e12}


def _gemm_rate(m: int, n: int, k: int, device: str, fp32_out: bool) -> dict:
    """cuBLAS (torch.mm) bf16 rate for an (m x k) @ (k x n) product, bf16 or fp32 output."""
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=device, dtype=torch.bfloat16).t()
    out_dtype = {"out_dtype": torch.float32} if fp32_out else {}  # CUDA only in torch 2.x
    row = {"m": m, "n": n, "k": k, "out": "fp32" if fp32_out else "bf16"}
    try:
        seconds = _median_s(lambda: torch.mm(a, b, **out_dtype), device)
    except (RuntimeError, TypeError, NotImplementedError) as err:  # out_dtype missing on this build/device
        return row | {"error": f"{type(err).__name__}: {str(err)[:160]}"}
    return row | {"seconds": seconds, "tflops": 2.0 * m * n * k / seconds / 1e12}


def measure_ceilings(device: str, dims: tuple[int, ...] = (768, 1024), smoke: bool = False) -> dict:
    """The card's rates at this problem's shapes.

    Args:
        device: "cuda" or "cpu" (smoke: tiny sizes, only checks the code runs).
        dims: the feature dims of the products (student d and guide dg).
        smoke: tiny sizes.

    Returns:
        {"gemm": [{m, n, k, out, seconds, tflops}], "read": [{buffer_mib, reps, seconds, tb_per_s}]}:
        the logit-tile products (8192 x 8192 x d, bf16 and fp32 output; the chunked plan's shape) and
        the gradient product (8192 x d x 8192), and the read rate of a 16 MiB buffer (in L2 on an
        H100: 50 MB) and of a 4 GiB one (HBM).
    """
    side = 64 if smoke else 8192
    gemm = []
    for k in dims:
        gemm.append(_gemm_rate(side, side, k, device, fp32_out=False))
        gemm.append(_gemm_rate(side, side, k, device, fp32_out=True))
        gemm.append(_gemm_rate(side, k, side, device, fp32_out=False))
    l2_numel, hbm_numel = (1 << 12, 1 << 14) if smoke else (1 << 23, 1 << 31)
    read = [_read_rate(l2_numel, 2 if smoke else 64, device), _read_rate(hbm_numel, 1, device)]
    for row in gemm + read:
        print(f"[ceiling] {row}", flush=True)
    return {"gemm": gemm, "read": read}


def kernel_breakdown(step: Callable[[], object], device: str, top: int = 15) -> list[dict]:
    """Device time per kernel name over one call of `step` (a forward + backward), largest first.

    Returns rows {kernel, calls, ms, share}; on the CPU an empty list (nothing to attribute)."""
    if device != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    step()  # warm: compilation stays out of the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    total = sum(e.self_device_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [
        {"kernel": e.key[:120], "calls": e.count, "ms": e.self_device_time_total / 1e3,
         "share": e.self_device_time_total / total}
        for e in events[:top]
    ]  # fmt: skip
