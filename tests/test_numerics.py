"""The numerical range of the loss: every input the loss accepts is computed right on every backend,
and what no backend can compute right is refused with an error naming the argument.

Two limits (docs/loss.md, "Numerical range"): rows whose squared L2 norm overflows the compute dtype
(their norms would come out Inf and their cosines 0: a wrong finite loss with zero gradient), and
temperatures below `MIN_TEMPERATURE` (the torch and cpp backends' float32 softmax exponent carries
round-off that grows like eps / temperature: 0.45 of the gradient's scale at 1e-8, NaN from 1e-9;
benchmarks/results/temperature_sweep_cpu.md). The accepted edge of each
is checked against the float64 oracle on every CPU backend (Triton under the interpreter).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re

import pytest
import torch
from problems import assert_matches_oracle, draw_problem, rng_for

import gist_fast
from gist_fast.inputs import MIN_TEMPERATURE, SQUARED_NORM_HEADROOM

NAMES = ["anchor", "positive", "guide_anchor", "guide_positive", "negatives", "guide_negatives"]


def _cpp_builds() -> bool:
    try:
        from gist_fast.backends.cpp_backend import load_extension

        load_extension()
    except Exception:  # noqa: BLE001 - no compiler or ninja here: the cpp backend is skipped
        return False
    return True


BACKENDS = [
    "reference",
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif(not _cpp_builds(), reason="the C++ extension cannot be built")),
    pytest.param(
        "triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
    ),
]


def largest_accepted_norm(dtype: torch.dtype) -> float:
    return math.sqrt(torch.finfo(dtype).max * SQUARED_NORM_HEADROOM)


def arguments(dtype: torch.dtype, rows: int = 5, dim: int = 6, guide_dim: int = 7) -> dict:
    gen = torch.Generator().manual_seed(rng_for("numerics-args").getrandbits(63))
    student = torch.randn(3, rows, dim, generator=gen, dtype=dtype).unbind(0)
    guide = torch.randn(3, rows, guide_dim, generator=gen, dtype=dtype).unbind(0)
    return {
        "anchor": student[0], "positive": student[1], "negatives": student[2],
        "guide_anchor": guide[0], "guide_positive": guide[1], "guide_negatives": guide[2],
    }  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_row_whose_squared_norm_overflows_is_refused_by_name_and_row(name, dtype):
    """|x| = 1e20 in float32 (1e160 in float64) made the norm Inf: a finite, wrong loss and a zero
    gradient on reference, torch and cpp. Now the argument and the row are named."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    args = arguments(dtype)
    args[name] = args[name].clone()
    args[name][3] = 2.0 * largest_accepted_norm(compute) / math.sqrt(args[name].shape[1])
    named = re.escape(f"{name}[0]" if name.endswith("negatives") else name)
    with pytest.raises(ValueError, match=rf"^{named} row 3 has L2 norm .* overflows the {str(compute)[6:]}"):
        gist_fast.gist_loss(**args, backend="reference")


def test_a_float64_input_lifts_the_norm_limit_to_float64():
    """With one float64 input every backend computes in float64: float32 inputs of norm 1e20 are fine."""
    args = arguments(torch.float32)
    args["anchor"] = args["anchor"] * 1e20
    args["guide_negatives"] = args["guide_negatives"].double()
    assert torch.isfinite(gist_fast.gist_loss(**args, backend="reference"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_longest_accepted_rows_are_computed_right(backend):
    """Rows at the largest accepted float32 norm, beside ordinary rows: every backend matches the
    float64 oracle. This is what the limit promises, so it fails if the limit is set too high."""
    problem = draw_problem(rng_for("numerics-norm", backend), 9, 24, 40, 1, options={"temperature": 0.05})
    edge = 0.99 * largest_accepted_norm(torch.float32)
    for t in problem.student + problem.guide:
        t[::2] *= edge / t[::2].norm(dim=1, keepdim=True)  # every other row at the edge
    assert_matches_oracle(functools.partial(gist_fast.gist_loss, backend=backend), problem, torch.float32)


@pytest.mark.parametrize("temperature", [3e-10, 1e-8, MIN_TEMPERATURE / 2])
def test_temperature_below_the_minimum_is_refused(temperature):
    """At 3e-10 torch and cpp gave NaN gradients with a finite loss; at 1e-8 cpp's were 45% off."""
    with pytest.raises(ValueError, match=rf"temperature must be >= {MIN_TEMPERATURE:g}; got {temperature:g}"):
        gist_fast.gist_loss(**arguments(torch.float32), temperature=temperature, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("correlated", [True, False], ids=["correlated", "uncorrelated"])
def test_smallest_accepted_temperature_is_computed_right(backend, correlated):
    """At `MIN_TEMPERATURE`, float32 on every backend matches the float64 oracle within the float32
    tolerance (tests/problems.py); it fails if the minimum is set where round-off takes over."""
    for trial in range(2):
        problem = draw_problem(
            rng_for("numerics-temperature", backend, correlated, trial), 17, 24, 16, 1,
            options={"temperature": MIN_TEMPERATURE, "reduction": "mean"}, correlated=correlated,
        )  # fmt: skip
        assert_matches_oracle(functools.partial(gist_fast.gist_loss, backend=backend), problem, torch.float32)
