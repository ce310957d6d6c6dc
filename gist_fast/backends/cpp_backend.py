"""The native C++ CPU backend: the two-pass plan (benchmarks/NOTES.md) in one fused kernel.

The kernel lives in ``csrc/gist_cpu.cpp`` and is compiled on first use with ninja through
``torch.utils.cpp_extension.load`` (about a minute, once per torch / Python version: the build is
cached under ``$TORCH_EXTENSIONS_DIR/gist_fast`` or ``~/.cache/gist_fast/torch_extensions``). Per
(row tile, column tile) it runs the student and guide dots as matmuls, then one fused sweep per
row that masks, updates the online logsumexp and forms the exp weights; row tiles (pass 1) and
column tiles (pass 2) are spread over OpenMP threads without atomics, so results are deterministic.
With ``matryoshka_dims`` every prefix dim is computed in the same two passes (cpp_matryoshka.py).

The autograd glue mirrors the tiled torch backend: for ``reduction="mean"``/``"sum"`` the forward
call computes loss and gradients and backward scales them; for ``"none"`` pass 2 runs in backward
with the per-row incoming weights. Half-precision inputs are upcast to float32 here (float64 when
any input is float64) and the gradients are returned in each input's dtype.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import site
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

from ..inputs import GISTInputs, GISTOptions
from .common import one_pass_matryoshka, reduce, refuse_double_backward, row_weight
from .ties import guide_row_ids

TILE_ROWS = 128
TILE_COLS = 512

_SOURCES = ("gist_cpu.cpp",)
_EXTENSION = None
_LOCK = threading.Lock()


def _source_candidates() -> list[Path]:
    """csrc/ of a source checkout (editable install), then where a wheel puts it: pyproject's
    data-files install it to <prefix>/share/gist_fast/csrc (prefix = the environment, or the user
    base for ``pip install --user``)."""
    package = Path(__file__).resolve().parents[1]
    candidates = [package.parent / "csrc"]
    for prefix in (sys.prefix, sys.base_prefix, site.getuserbase()):
        candidates.append(Path(prefix) / "share" / "gist_fast" / "csrc")
    return candidates


def source_dir() -> Path:
    """The directory holding the C++ sources."""
    candidates = _source_candidates()
    for candidate in candidates:
        if all((candidate / name).is_file() for name in _SOURCES):
            return candidate
    raise RuntimeError(
        f"gist_fast backend='cpp': the C++ sources {_SOURCES} were found in none of "
        f"{[str(c) for c in candidates]}; reinstall gist-fast or use backend='torch'"
    )


def build_directory() -> Path:
    """A cache directory per torch / Python version and source contents."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) / "gist_fast" if root else Path.home() / ".cache" / "gist_fast" / "torch_extensions"
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((source_dir() / name).read_bytes())
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{digest.hexdigest()[:12]}"
    return base / tag.replace("+", "_")


def _ensure_toolchain() -> None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"gist_fast backend='cpp' compiles a C++ extension on first use, but no C++ compiler ({compiler!r}) "
            "was found on PATH: install g++ (e.g. `apt-get install g++`) or set CXX, or use backend='torch'"
        )
    if shutil.which("ninja") is None:
        try:  # the `ninja` pip package puts its binary beside the interpreter, maybe not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    if shutil.which("ninja") is None:
        raise RuntimeError(
            "gist_fast backend='cpp' builds its C++ extension with ninja, which was not found: "
            "`pip install ninja`, or use backend='torch'"
        )


def _openmp_flags() -> list[str]:
    """OpenMP spreads the tiles over threads (at::get_num_threads() of them). Apple's clang has no
    -fopenmp: there the kernel runs on one thread."""
    return [] if sys.platform == "darwin" else ["-fopenmp"]


def load_extension():
    """Compile (first call only, cached on disk) and import the C++ extension."""
    global _EXTENSION
    if _EXTENSION is not None:
        return _EXTENSION
    with _LOCK:
        if _EXTENSION is None:
            _ensure_toolchain()
            from torch.utils import cpp_extension

            directory = build_directory()
            directory.mkdir(parents=True, exist_ok=True)
            sources = [str(source_dir() / name) for name in _SOURCES]
            try:
                # -fno-trapping-math lets GCC if-convert the sweeps' selects (the mask, exp's range
                # clamp): without it their `omp simd` loops compiled to scalar code (GCC 12).
                _EXTENSION = cpp_extension.load(
                    name="gist_fast_cpu",
                    sources=sources,
                    extra_cflags=["-O3", "-fno-math-errno", "-fno-trapping-math", *_openmp_flags()],
                    extra_ldflags=_openmp_flags(),
                    build_directory=str(directory),
                    verbose=os.environ.get("GIST_FAST_VERBOSE_BUILD", "") == "1",
                )
            except Exception as error:
                raise RuntimeError(
                    f"gist_fast backend='cpp': building the C++ extension in {directory} failed ({error}); "
                    "set GIST_FAST_VERBOSE_BUILD=1 to see the compiler output, or use backend='torch'"
                ) from error
    return _EXTENSION


def extension_available() -> bool:
    """Whether backend='cpp' can run here: builds the extension on the first call (a minute on two
    cores, then cached on disk) and says False instead of raising when it cannot be built."""
    try:
        load_extension()
    except RuntimeError:
        return False
    return True


def _compute_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _option_args(options: GISTOptions, tiles: tuple[int, int]) -> tuple:
    return (
        options.temperature,
        options.margin_strategy == "relative",
        options.margin,
        options.contrast_anchors,
        options.contrast_positives,
        options.offset,
        *tiles,
    )


def mask_bytes(inputs: GISTInputs, options: GISTOptions) -> int:
    """Size of pass 1's guide-mask bitmask: one bit per logit, rows padded to 64 bits, per block."""
    B, P = inputs.batch_size, inputs.num_candidates
    columns = [P] + ([B] if options.contrast_anchors else []) + ([P] if options.contrast_positives else [])
    columns += [P] * len(inputs.negatives)
    return sum(B * ((n + 63) // 64) * 8 for n in columns)


def _default_mask_limit(inputs: GISTInputs) -> int:
    """Keep the bitmask when it is no bigger than the inputs themselves (float32 bytes): it then at
    most doubles the memory the loss holds, and spares pass 2 its guide dots (1/6 of the FLOPs at
    d = dg). Beyond that (B > ~20k at d = 384, k = 1) pass 2 recomputes the guide dots: memory stays
    linear in B."""
    return sum(4 * t.numel() for t in (*inputs.student_tensors, *inputs.guide_tensors))


class _GISTCppFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, options: GISTOptions, num_negatives: int, tiles: tuple[int, int], keep_mask: bool, *tensors: Tensor
    ):
        ext = load_extension()
        k = num_negatives
        dtype = _compute_dtype(tensors)
        cast = [t.detach().to(dtype) for t in tensors]
        student, guide = cast[: 2 + k], cast[2 + k :]
        # Exact ties: the id of every guide row (bitwise-equal rows share one), as the kernel takes them.
        ids = [i.to(torch.int32) for i in guide_row_ids(tensors[2 + k :])]
        args = _option_args(options, tiles)
        needs_grad = any(ctx.needs_input_grad[4 : 6 + k])
        losses, lse, threshold, tie_masked, e_a, e_p, mask = ext.forward(
            student, guide, ids, *args, keep_mask and needs_grad
        )
        B = losses.shape[0]
        loss = reduce(losses, options.reduction)

        ctx.options, ctx.k, ctx.tiles = options, k, tiles
        ctx.dtypes = [t.dtype for t in tensors[: 2 + k]]
        if not needs_grad:
            return loss
        if options.reduction == "none":
            # Per-row incoming weights are unknown until backward: keep what pass 2 needs.
            ctx.save_for_backward(lse, threshold, tie_masked, e_a, e_p, mask, *ids, *cast)
            ctx.deferred = True
        else:
            weight = torch.full((B,), row_weight(options, B), dtype=dtype)
            grads = ext.backward(student, guide, ids, lse, threshold, tie_masked, e_a, e_p, weight, *args, True, mask)
            del e_a, e_p, mask
            ctx.save_for_backward(*[g.to(t) for g, t in zip(grads, ctx.dtypes, strict=True)])
            ctx.deferred = False
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        refuse_double_backward()
        k = ctx.k
        n_student = 2 + k
        if not any(ctx.needs_input_grad[4 : 6 + k]):
            return (None,) * (4 + 2 * n_student)
        if ctx.deferred:
            lse, threshold, tie_masked, e_a, e_p, mask, *saved = ctx.saved_tensors
            ids, cast = saved[:n_student], saved[n_student:]
            ext = load_extension()
            weight = grad_out.detach().to(lse.dtype).contiguous()
            args = _option_args(ctx.options, ctx.tiles)
            # consume=False: saved tensors stay intact (retain_graph may call backward again).
            grads = ext.backward(
                cast[:n_student],
                cast[n_student:],
                ids,
                lse,
                threshold,
                tie_masked,
                e_a,
                e_p,
                weight,
                *args,
                False,
                mask,
            )
            grads = [g.to(t) for g, t in zip(grads, ctx.dtypes, strict=True)]
        else:
            grads = list(ctx.saved_tensors)
            # loss.backward() sends exactly 1: hand the saved gradients over without a copy.
            if not bool((grad_out == 1).all()):
                grads = [g * grad_out.to(g.dtype) for g in grads]
        student = [g if ctx.needs_input_grad[4 + i] else None for i, g in enumerate(grads)]
        return (None, None, None, None, *student, *([None] * n_student))


@one_pass_matryoshka
def gist_loss_cpp(
    inputs: GISTInputs,
    options: GISTOptions,
    *,
    tile_rows: int = TILE_ROWS,
    tile_cols: int = TILE_COLS,
    mask_limit_bytes: int | None = None,
) -> Tensor:
    """GIST loss by the native CPU kernel; memory linear in B.

    `tile_rows` x `tile_cols` is the logit tile each thread holds (twice: student and guide).
    Pass 1 keeps the guide mask as bits for pass 2 when they take at most `mask_limit_bytes`
    (default: the size of the inputs in float32, see `_default_mask_limit`; 0 never keeps them).
    With ``options.matryoshka_dims`` every prefix dim comes from one sweep (`cpp_matryoshka`).

    Example:
        >>> import gist_fast
        >>> a, p, ga, gp = torch.randn(4, 8, 16).unbind(0)
        >>> gist_fast.gist_loss(a, p, ga, gp, backend="cpp", matryoshka_dims=(16, 4)).shape  # runs gist_loss_cpp
        torch.Size([])
    """
    if inputs.anchor.device.type != "cpu":
        raise ValueError(f"backend='cpp' runs on the CPU; the inputs are on {inputs.anchor.device}")
    if tile_rows < 1 or tile_cols < 1:
        raise ValueError(f"tile sizes must be >= 1; got tile_rows={tile_rows}, tile_cols={tile_cols}")
    limit = _default_mask_limit(inputs) if mask_limit_bytes is None else mask_limit_bytes
    if options.matryoshka_dims is not None:
        from .cpp_matryoshka import gist_loss_cpp_matryoshka  # it builds on this module

        keep_mask = mask_bytes(inputs, options) <= limit
        return gist_loss_cpp_matryoshka(inputs, options, tile_rows=tile_rows, tile_cols=tile_cols, keep_mask=keep_mask)
    return _GISTCppFunction.apply(
        options,
        len(inputs.negatives),
        (tile_rows, tile_cols),
        mask_bytes(inputs, options) <= limit,
        *inputs.student_tensors,
        *inputs.guide_tensors,
    )
