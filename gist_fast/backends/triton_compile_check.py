"""Compile the Triton kernels for an NVIDIA GPU without one, and report their resources.

Triton compiles ahead of time for a named target with the ptxas bundled in its wheel, so a CPU-only
machine (CI) can check that every kernel variant the backend launches builds for sm_90, and read
the registers and spill stack of each from the cubin. The interpreter tests check the arithmetic;
this checks what only a GPU build sees (dot shapes, layouts, types, register spills).

Run it in a process where TRITON_INTERPRET is unset (the interpreter replaces `triton.jit`):

    python -m gist_fast.backends.triton_compile_check            # default tiles, bf16, sm_90
    python -m gist_fast.backends.triton_compile_check 64 64 64 8 # BLOCK_M BLOCK_N BLOCK_K warps
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from . import triton_kernels as K
from .triton_backend import GPU_BLOCKS, Blocks

_STUDENT = {"a", "p", "n", "ga", "gp", "gn", "grad_a", "grad_p", "out", "x", "y"}
_FP32_PTRS = {"norms", "gnorms", "thr_ptr", "weight_ptr", "lse_out", "target_out", "lse_ptr", "scratch"}


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _FP32_PTRS or (name == "out" and fn is K.row_dots_kernel):
            sig[name] = "*fp32"
        elif name in _STUDENT:
            sig[name] = f"*{dtype}"
        elif name == "inv_temp":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def kernel_variants(blocks: Blocks) -> list[tuple[str, object, dict]]:
    """(name, kernel, constexprs) of every launch of a forward+backward with both contrast blocks."""
    tiles = {"BLOCK_M": blocks.m, "BLOCK_N": blocks.n, "BLOCK_K": blocks.k, "UPCAST": False, "PRECISION": "ieee"}
    flags = {"CONTRAST_ANCHORS": True, "CONTRAST_POSITIVES": True, "WITH_GRAD": True}
    variants = [("row_pass", K.row_pass_kernel, tiles | flags)]
    variants += [
        (f"column_pass[source={s}]", K.column_pass_kernel, tiles | {"SOURCE": s, "CONTRAST_POSITIVES": True})
        for s in (0, 1, 2)
    ]
    variants.append(("row_dots", K.row_dots_kernel, {"BLOCK_R": 16, "BLOCK_K": 64}))
    return variants


def _resources(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"REG:{found[1]} STACK:{found[2]}" if found else "?"


def compile_all(blocks: Blocks = GPU_BLOCKS, dtype: str = "bf16", capability: int = 90) -> dict[str, str]:
    """Compile every kernel variant for `capability`; return name -> 'REG:r STACK:s' (spill bytes)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels being compiled")
    target = GPUTarget("cuda", capability, 32)
    report = {}
    for name, kernel, constexprs in kernel_variants(blocks):
        src = triton.compiler.ASTSource(
            fn=kernel, signature=_signature(kernel, dtype, constexprs), constexprs=constexprs
        )
        compiled = triton.compile(src, target=target, options={"num_warps": blocks.warps})
        report[name] = _resources(compiled.asm["cubin"])
    return report


def main(argv: list[str]) -> int:
    blocks = Blocks(*map(int, argv[:3]), warps=int(argv[3])) if len(argv) >= 4 else GPU_BLOCKS
    dtype = argv[4] if len(argv) >= 5 else "bf16"
    for name, resources in compile_all(blocks, dtype).items():
        print(f"{name}: {resources}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
