"""Backends of the GIST loss and the choice among them.

A backend is a function ``(GISTInputs, GISTOptions) -> Tensor`` that returns the reduced loss with
autograd support for the student inputs. Each lives in its own module and is imported on first
use, so a missing optional dependency (Triton, a C++ toolchain) only matters when it is asked for.

Matryoshka losses (``options.matryoshka_dims``): a backend that computes every prefix dim itself
in one pass marks its function with `common.one_pass_matryoshka` ("reference", "torch", "cpp" and
"triton_chunked" do);
`run` calls any other backend once per dim on truncated inputs (`matryoshka.compose_per_dimension`).
A backend opts in by decorating its function; nothing here changes.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

from torch import Tensor

from ..inputs import GISTInputs, GISTOptions
from .common import has_one_pass_matryoshka
from .matryoshka import compose_per_dimension

BackendFn = Callable[[GISTInputs, GISTOptions], Tensor]

# name -> (module, function)
_BACKENDS: dict[str, tuple[str, str]] = {
    "reference": ("gist_fast.backends.reference", "gist_loss_reference"),
    "torch": ("gist_fast.backends.torch_tiled", "gist_loss_torch"),
    "triton": ("gist_fast.backends.triton", "gist_loss_triton"),
    "triton_chunked": ("gist_fast.backends.triton", "gist_loss_triton_chunked"),
    "cpp": ("gist_fast.backends.cpp_backend", "gist_loss_cpp"),
}

BACKENDS = ("auto", *_BACKENDS)


def register_backend(name: str, module: str, function: str) -> None:
    """Make ``backend=name`` call ``module.function``, imported lazily."""
    global BACKENDS
    _BACKENDS[name] = (module, function)
    BACKENDS = ("auto", *_BACKENDS)


# The fused plan wins on small problems, the chunked plan (GEMM-shaped kernels per chunk of the
# logits) on large ones. Measured on an H200 (benchmarks/results/gpu_nvidia-h200_2026-11-29/, bf16,
# d = 768, one negative column): B = 4096 (6.7e7 logits) fused 13.1 ms vs chunked 15.5 ms;
# B = 16384 (1.1e9 logits) fused 130 ms vs chunked 61 ms. The switch sits between the two.
FUSED_PLAN_MAX_LOGITS = 2**27


def triton_plan(batch: int, candidates: int, negative_columns: int) -> str:
    """The faster Triton plan for a problem of ``batch`` anchors, ``candidates`` positives and
    ``negative_columns`` negative columns: ``"triton"`` (fused) below `FUSED_PLAN_MAX_LOGITS` logits
    (counted with every contrast block), else ``"triton_chunked"``.

    Example:
        >>> triton_plan(4096, 4096, 1), triton_plan(16384, 16384, 1)
        ('triton', 'triton_chunked')
    """
    logits = batch * (batch + candidates * (2 + negative_columns))
    return "triton" if logits < FUSED_PLAN_MAX_LOGITS else "triton_chunked"


def auto_backend(inputs: GISTInputs, options: GISTOptions | None = None) -> str:
    """The best backend for the inputs' device and size: on CUDA where Triton is installed (it is
    not on every platform torch's CUDA builds run on), the faster Triton plan for the shape
    (`triton_plan`), and the chunked plan for a Matryoshka loss (only it has the one-pass path);
    else the tiled torch one."""
    if inputs.anchor.device.type == "cuda" and "triton" in _BACKENDS and _triton_installed():
        if options is not None and options.matryoshka_dims is not None:
            return "triton_chunked"
        return triton_plan(inputs.batch_size, inputs.num_candidates, len(inputs.negatives))
    return "torch"


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def get_backend(name: str, inputs: GISTInputs, options: GISTOptions | None = None) -> BackendFn:
    """Resolve ``name`` (or ``"auto"``, see `auto_backend`) to a backend function; unknown names
    raise ValueError."""
    if name == "auto":
        name = auto_backend(inputs, options)
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    module, function = _BACKENDS[name]
    # The Triton subpackage and its modules import triton at their top.
    if f"{module}.".startswith("gist_fast.backends.triton.") and not _triton_installed():
        raise ValueError(f"backend={name!r} needs the package triton (pip install triton), or use backend='torch'")
    return getattr(importlib.import_module(module), function)


def run(name: str, inputs: GISTInputs, options: GISTOptions) -> Tensor:
    """The loss by backend `name`. With ``options.matryoshka_dims``, a backend marked
    `common.one_pass_matryoshka` computes every prefix dim in one pass; any other backend is called
    once per dim (`matryoshka.compose_per_dimension`), which is correct but repeats the shared work."""
    backend_fn = get_backend(name, inputs, options)
    if options.matryoshka_dims is None or has_one_pass_matryoshka(backend_fn):
        return backend_fn(inputs, options)
    return compose_per_dimension(backend_fn, inputs, options)
