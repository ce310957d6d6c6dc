"""Which side of the first GPU run's fp32 check was off? CPU experiments (benchmarks/NOTES.md, "The fp32 check").

The H200 run flagged both Triton plans' fp32 gradients at 4.8e-4 of the largest gradient from
fp32 ``backend="torch"`` (B = 16384, d = 768, dg = 1024, tau = 0.01, the benchmark's random
inputs). Two measurements on the CPU, same input generator:

- ``errors B METHOD...``: each fp32 method's loss and gradients against the reference backend in
  float64 on the same inputs (methods: torch, reference32, fused, chunked; the Triton plans run
  under the interpreter, minutes at d = 768 even for B = 128);
- ``flips B ROWS``: how many guide-mask decisions fp32 takes differently from float64 on the first
  ROWS anchors (guide cosines as "torch" forms them, normalised then multiplied, and as the kernels
  do, dot then divided), and the largest float64 softmax weight on such an entry: the most a flip
  can move a row's gradient, relative to its largest term.

Example (repo root):
    .venv/bin/python benchmarks/fp32_check_cpu.py errors 2048 torch reference32
    .venv/bin/python benchmarks/fp32_check_cpu.py flips 16384 1024
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from bench_triton_gpu import _rel_err, _validated, make_inputs  # noqa: E402

from gist_fast.backends.reference import gist_loss_reference  # noqa: E402
from gist_fast.backends.torch_tiled import gist_loss_torch  # noqa: E402
from gist_fast.backends.triton import Chunks, gist_loss_triton  # noqa: E402

DIM, GUIDE_DIM, TEMPERATURE = 768, 1024, 0.01
METHODS = {
    "torch": gist_loss_torch,
    "reference32": gist_loss_reference,
    "fused": lambda i, o: gist_loss_triton(i, o),
    "chunked": lambda i, o: gist_loss_triton(i, o, blocks=Chunks(rows=256, columns=512, tile_m=64, tile_n=64,
                                                                 tile_k=64, gemm_m=64, gemm_n=64, gemm_k=64)),
}  # fmt: skip


def _run(fn, student, guide):
    s = [t.detach().clone().requires_grad_() for t in student]
    loss = fn(*_validated(s, guide))
    loss.backward()
    return loss.detach(), [t.grad for t in s]


def errors(batch: int, methods: list[str]) -> None:
    student, guide = make_inputs(batch, DIM, GUIDE_DIM, torch.float32, "cpu", seed=1)
    want_loss, want = _run(gist_loss_reference, [t.double() for t in student], [t.double() for t in guide])
    for name in methods:
        start = time.perf_counter()
        loss, grads = _run(METHODS[name], student, guide)
        errs = " ".join(f"{_rel_err(g, w):.2e}" for g, w in zip(grads, want, strict=True))
        print(f"B={batch} {name}: loss {_rel_err(loss, want_loss):.2e}, gradients (anchor positive negative) "
              f"{errs} of the largest, {time.perf_counter() - start:.0f} s")  # fmt: skip


def flips(batch: int, rows: int) -> None:
    student, guide = make_inputs(batch, DIM, GUIDE_DIM, torch.float32, "cpu", seed=1)
    (a, p, n), (ga, gp, gn) = [t.detach() for t in student], guide
    r = torch.arange(rows)

    def cos(x, y, dtype, style):
        x, y = x.to(dtype), y.to(dtype)
        if style == "normalised":  # "torch": normalised copies, then one matmul
            return (x / x.norm(dim=1, keepdim=True)) @ (y / y.norm(dim=1, keepdim=True)).T
        return (x @ y.T) / (x.norm(dim=1)[:, None] * y.norm(dim=1)[None, :])  # the kernels

    def blocks(dtype, style):  # AP, AA, PP, AN for the first `rows` anchors
        pairs = ((a, p, ga, gp), (a, a, ga, ga), (p, p, gp, gp), (a, n, ga, gn))
        s = torch.cat([cos(x[r], y, dtype, style) for x, y, _, _ in pairs], 1)
        g = torch.cat([cos(gx[r], gy, dtype, style) for _, _, gx, gy in pairs], 1)
        return s, g.double()

    def keep(g):
        k = ~(g > g[r, r][:, None])  # the AP diagonal is the threshold; the target is kept
        k[r, batch + r] = k[r, 2 * batch + r] = False  # self-similarities (the guide masks them too)
        return k

    s64, g64 = blocks(torch.float64, "divided")
    exact = keep(g64)
    z = s64 / TEMPERATURE
    # The float64 softmax weight each entry has, or would have if it were kept: what a flip moves.
    weights = torch.exp(z - torch.logsumexp(z.masked_fill(~exact, float("-inf")), 1, keepdim=True))
    for style in ("normalised", "divided"):
        _, g32 = blocks(torch.float32, style)
        flipped = keep(g32) != exact
        heaviest = weights[flipped].max().item() if flipped.any() else 0.0
        print(f"B={batch}, {rows} rows, fp32 guide cosines {style}: max error {(g32 - g64).abs().max():.1e}, "
              f"{int(flipped.sum())} decisions differ (~{flipped.sum().item() * batch / rows:.0f} over all rows), "
              f"largest float64 weight on one {heaviest:.1e}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    e = sub.add_parser("errors")
    e.add_argument("batch", type=int)
    e.add_argument("methods", nargs="+", choices=list(METHODS))
    f = sub.add_parser("flips")
    f.add_argument("batch", type=int)
    f.add_argument("rows", type=int)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.what == "errors":
        errors(args.batch, args.methods)
    else:
        flips(args.batch, min(args.rows, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
