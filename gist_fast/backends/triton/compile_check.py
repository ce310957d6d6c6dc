"""Compile the Triton kernels for an NVIDIA GPU without one, and report what the build looks like.

Triton compiles ahead of time for a named target with the ptxas bundled in its wheel, so a CPU-only
machine (CI) can check that every kernel variant the backend launches builds for sm_90, and read
from the build what decides its speed: registers and spill stack (cubin), shared memory, and in the
PTX the tensor-core instructions (`wgmma.mma_async`), the asynchronous copies (`cp.async`) that
show the dot loops are software-pipelined, and any float64 instruction (none is needed: one means a
literal Triton typed as float64, as triton 3.6 does for one below float32's normal range). The
interpreter tests check the arithmetic; this checks what only a GPU build sees.

Each kernel is built with the specialisation a real launch gets: Triton's JIT marks pointers and
integer arguments divisible by 16 (nothing else; a stride of 1 is *not* specialised), so the
integer arguments are given sample values of a realistic problem (`--dims`).

Run it in a process where TRITON_INTERPRET is unset (the interpreter replaces `triton.jit`):

    python -m gist_fast.backends.triton.compile_check                      # default tiles, bf16
    python -m gist_fast.backends.triton.compile_check --blocks 64 128 32 8 --stages 3 --dims 768 1024
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

from . import chunked_kernels as CK
from . import fused_kernels as K
from . import shared_kernels as SK
from .chunked import Chunks, stats_blocks
from .common import padded_width
from .fused import GPU_BLOCKS, Blocks

_STUDENT = {"a", "p", "n", "ga", "gp", "gn", "grad_a", "grad_p", "out", "x", "y", "gx", "gy", "w_out", "b"}
_FP32_PTRS = {
    "norms", "gnorms", "thr_ptr", "weight_ptr", "lse_out", "target_out", "lse_ptr", "scratch",
    "norms_x", "gnorms_x", "norms_y", "gnorms_y", "tile_max", "tile_sum", "tile_exp", "row_coef",
    "alpha", "row_scale", "k_scale", "peak", "big", "total", "ref", "pnorms_x", "pnorms_y", "col_dot",
}  # fmt: skip
# guide-row ids and tie codes (exact ties); the Matryoshka dims' segment bounds
_I32_PTRS = {"gids", "ties", "gids_y", "bounds"}
# The Matryoshka variant is built for five dims (768, 512, 256, 128, 64 at d = 768).
MATRYOSHKA_DIMS = 5


@dataclass(frozen=True)
class Build:
    """What one compiled kernel looks like."""

    registers: int
    spill_bytes: int
    shared_bytes: int
    wgmma: int  # wgmma.mma_async instructions in the PTX (Hopper tensor cores)
    cp_async: int  # cp.async instructions in the PTX (pipelined global -> shared copies)
    f64: int  # instructions on float64 values in the PTX (none is needed; a stray literal makes them)

    def __str__(self) -> str:
        return (
            f"REG:{self.registers} STACK:{self.spill_bytes} SHARED:{self.shared_bytes} "
            f"WGMMA:{self.wgmma} CP_ASYNC:{self.cp_async} F64:{self.f64}"
        )


def _sample_ints(d: int, dg: int, chunks: Chunks, rows: int = 65536, negatives: int = 1) -> dict[str, int]:
    """Integer arguments of a contiguous problem with B = P = rows (their divisibility is what the
    JIT specialises on); the chunked kernels' chunk is chunks.rows x chunks.columns."""
    chunk = chunks.columns
    tiles = -(-chunk // chunks.tile_n)
    # Feature dims and row strides as the launcher lays the inputs out: padded to ROW_ALIGN (v3d).
    sd, sg = padded_width(d), padded_width(dg)
    return {
        "B": rows, "P": rows, "d": sd, "dg": sg, "offset": 0, "num_neg": negatives,
        "s_a": sd, "s_p": sd, "s_nm": rows * sd, "s_n": sd, "s_ga": sg, "s_gp": sg, "s_gnm": rows * sg, "s_gn": sg,
        "n_rows": rows, "dim": sd, "s_x": sd, "s_y": sd, "s_gx": sg, "s_gy": sg,
        "x_shift": 0, "row0": 0, "col0": 0, "n_cols": chunk, "s_w": chunk, "s_t": tiles,
        "s_out": sd, "b_row0": 0, "s_b": sd, "s_rs": tiles, "M": chunks.rows, "N": sd, "K": chunk,
        "nr": chunks.rows, "tiles": tiles,
        # the Matryoshka tile kernel: per-dim strides of the prefix norms, lse / target, W, tile stats, coefficients
        "s_pn": rows * (2 + negatives), "s_kb": rows, "s_wk": chunks.rows * chunk, "s_tk": chunks.rows * tiles,
        "s_coef": rows, "s_ck": -(-chunks.rows // chunks.tile_m) * chunk, "s_cm": chunk,
    }  # fmt: skip


def _signature(fn, dtype: str, constexprs: dict, ints: dict[str, int]) -> tuple[dict, dict]:
    """(signature, attrs) of `fn` as the JIT would build them for a launch with `ints`."""
    sig, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name in _FP32_PTRS or (name == "out" and fn in (SK.row_dots_kernel, CK.scaled_gemm_kernel)):
            sig[name] = "*fp32"
        elif name in _I32_PTRS:
            sig[name] = "*i32"
        elif name in _STUDENT:
            sig[name] = f"*{dtype}"
        elif name == "inv_temp":
            sig[name] = "fp32"
            continue
        else:
            sig[name] = "i32"
        # torch allocations are 16-byte aligned; integers as the sample problem has them.
        if sig[name].startswith("*") or ints[name] % 16 == 0:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return sig, attrs


DEFAULT_CHUNKS = Chunks()


def kernel_variants(
    blocks: Blocks, chunks: Chunks = DEFAULT_CHUNKS, dtype: str = "bf16"
) -> list[tuple[str, object, dict, dict]]:
    """(name, kernel, constexprs, launch options) of every launch of a forward+backward with both
    contrast blocks, for the fused plan (`blocks`) and the chunked one (`chunks`)."""
    dots = {"UPCAST": False, "PRECISION": "ieee"}
    flags = {"CONTRAST_ANCHORS": True, "CONTRAST_POSITIVES": True, "WITH_GRAD": True}
    fused = {"num_warps": blocks.warps, "num_stages": blocks.stages}
    variants = [("row_pass", K.row_pass_kernel, blocks.row_pass() | dots | flags, fused)]
    variants += [
        (
            f"column_pass[source={s}]",
            K.column_pass_kernel,
            blocks.column_pass() | dots | {"SOURCE": s, "CONTRAST_POSITIVES": True},
            fused,
        )
        for s in (0, 1, 2)
    ]
    variants.append(("row_dots", SK.row_dots_kernel, {"BLOCK_R": 16, "BLOCK_K": 64}, fused))
    tile = {"BLOCK_M": chunks.tile_m, "BLOCK_N": chunks.tile_n, "BLOCK_K": chunks.tile_k} | dots
    gemm = {"BLOCK_M": chunks.gemm_m, "BLOCK_N": chunks.gemm_n, "BLOCK_K": chunks.gemm_k, "TILE": chunks.tile_n} | dots
    tile_opts = {"num_warps": chunks.tile_warps, "num_stages": chunks.stages}
    gemm_opts = {"num_warps": chunks.gemm_warps, "num_stages": chunks.stages}
    pass1 = {"A_TRANSPOSED": False, "HAS_ALPHA": True, "HAS_ROW_SCALE": True, "HAS_K_SCALE": False}
    pass2 = {"A_TRANSPOSED": True, "HAS_ALPHA": False, "HAS_ROW_SCALE": False, "HAS_K_SCALE": True}
    below_peak = {"BELOW_PEAK": dtype == "fp16"}
    variants += [
        ("chunk_tile[pass1]", CK.tile_kernel, tile | {"MODE": 0, "IS_TARGET_BLOCK": True, "WRITE_W": True}, tile_opts),
        ("chunk_tile[pass2]", CK.tile_kernel, tile | {"MODE": 1, "IS_TARGET_BLOCK": True, "WRITE_W": True}, tile_opts),
        *(
            (
                f"chunk_tile_matryoshka[pass{mode + 1}]",
                CK.matryoshka_tile_kernel,
                tile | {"MODE": mode, "IS_TARGET_BLOCK": True, "WRITE_W": True, "NUM_DIMS": MATRYOSHKA_DIMS},
                tile_opts,
            )
            for mode in (0, 1)
        ),  # fmt: skip
        ("chunk_gemm[pass1]", CK.scaled_gemm_kernel, gemm | pass1 | below_peak, gemm_opts),
        ("chunk_gemm[pass2]", CK.scaled_gemm_kernel, gemm | pass2 | below_peak, gemm_opts),
    ]
    block_r, block_t = stats_blocks(-(-chunks.columns // chunks.tile_n))
    stats = {"BLOCK_R": block_r, "BLOCK_T": block_t}
    variants += [
        (f"chunk_stats[{name}]", CK.chunk_stats_kernel, stats | {"WITH_GRAD": grad}, {"num_warps": 4})
        for name, grad in (("grad", True), ("forward", False))
    ]
    return variants


def _registers_and_spill(cubin: bytes) -> tuple[int, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return -1, -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(found[1]), int(found[2])) if found else (-1, -1)


def compile_all(
    blocks: Blocks = GPU_BLOCKS,
    dtype: str = "bf16",
    dims: tuple[int, int] = (768, 1024),
    capability: int = 90,
    chunks: Chunks = DEFAULT_CHUNKS,
) -> dict[str, Build]:
    """Compile every kernel variant for `capability`; return name -> Build."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels being compiled")
    target = GPUTarget("cuda", capability, 32)
    ints = _sample_ints(*dims, chunks)
    report = {}
    for name, kernel, constexprs, options in kernel_variants(blocks, chunks, dtype):
        # The GEMM's A is a chunk matrix: its row stride is the chunk's width, not an input's.
        kernel_ints = ints | {"s_a": ints["s_w"]} if kernel is CK.scaled_gemm_kernel else ints
        signature, attrs = _signature(kernel, dtype, constexprs, kernel_ints)
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=target, options=options)
        ptx = compiled.asm["ptx"]
        report[name] = Build(
            *_registers_and_spill(compiled.asm["cubin"]),
            shared_bytes=compiled.metadata.shared,
            wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
            cp_async=len(re.findall(r"cp\.async", ptx)),
            f64=len(re.findall(r"^\s*[a-z][\w.]*\.f64\b", ptx, flags=re.MULTILINE)),
        )
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--blocks", nargs=4, type=int, metavar=("OWNED", "STREAMED", "K", "WARPS"), help="tile shape and warps"
    )
    parser.add_argument("--stages", type=int, default=GPU_BLOCKS.stages, help="software-pipelining stages")
    parser.add_argument("--chunk-tile", nargs=4, type=int, metavar=("M", "N", "K", "WARPS"), help="chunked tile kernel")
    parser.add_argument("--chunk-gemm", nargs=4, type=int, metavar=("M", "N", "K", "WARPS"), help="chunked GEMM")
    parser.add_argument("--chunk-stages", type=int, default=DEFAULT_CHUNKS.stages, help="stages of the chunked kernels")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--dims", nargs=2, type=int, default=[768, 1024], metavar=("D", "DG"), help="feature dims")
    parser.add_argument("--markdown", type=Path, help="also write the report as a markdown results file")
    args = parser.parse_args(argv)
    blocks = GPU_BLOCKS
    if args.blocks:
        owned, streamed, k, warps = args.blocks
        blocks = replace(blocks, owned=owned, streamed=streamed, k=k, warps=warps)
    blocks = replace(blocks, stages=args.stages)
    chunks = replace(DEFAULT_CHUNKS, stages=args.chunk_stages)
    if args.chunk_tile:
        m, n, k, warps = args.chunk_tile
        chunks = replace(chunks, tile_m=m, tile_n=n, tile_k=k, tile_warps=warps)
    if args.chunk_gemm:
        m, n, k, warps = args.chunk_gemm
        chunks = replace(chunks, gemm_m=m, gemm_n=n, gemm_k=k, gemm_warps=warps)
    report = compile_all(blocks, args.dtype, tuple(args.dims), chunks=chunks)
    for name, build in report.items():
        print(f"{name}: {build}")
    if args.markdown:
        args.markdown.write_text(_markdown(report, blocks, chunks, args, argv))
    return 0


def _markdown(report: dict[str, Build], blocks: Blocks, chunks: Chunks, args, argv: list[str]) -> str:
    """The report as a results file naming the target, the versions and the command."""
    import platform

    import torch

    lines = [
        f"# Offline sm_90 build of the Triton kernels ({args.dtype}, d = {args.dims[0]}, dg = {args.dims[1]})",
        "",
        f"Command: `python -m gist_fast.backends.triton.compile_check {' '.join(argv)}`. Built ahead of time",
        f"for sm_90 (H100) on a machine without a GPU ({platform.machine()}, {platform.processor() or 'CPU'}),",
        f"triton {triton.__version__}, torch {torch.__version__}; no kernel ran. Fused tiles: {blocks};",
        f"chunked tiles: {chunks}.",
        "",
        "| kernel | registers | spill stack (B) | shared memory (B) | wgmma | cp.async | f64 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {name} | {b.registers} | {b.spill_bytes} | {b.shared_bytes} | {b.wgmma} | {b.cp_async} | {b.f64} |"
        for name, b in report.items()
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
