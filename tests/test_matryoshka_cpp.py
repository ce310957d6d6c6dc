"""The C++ backend's one-pass Matryoshka loss against the float64 composition of single-dim losses.

The oracle (test_matryoshka.composed) is ``sum_m w_m * reference(student[..., :m]; guide)`` in
float64 on the inputs rounded to the tested dtype. The kernel is called directly with tiles smaller
than the batch (rows and columns cross tile edges; dims 1, 7, 17, 33, 65 split the feature sweep
unevenly), with pass 1's guide-mask bits kept for pass 2 and without them, on planted exact ties
(test_ties.plant_ties) and on prefixes whose norm is below eps. Tolerances: problems.TOLERANCES
(float64 1e-9; float32 loss 2e-5, gradients 1e-4; half inputs upcast to float32, their gradients at
the fp16 / bf16 tolerances), relative to the compared tensor's largest magnitude, floors scaled by
the sum of |w_m| (test_matryoshka.assert_matches_composition).
"""

from __future__ import annotations

import pytest
import torch
from problems import OPTION_GRID, TOLERANCES, assert_close_scaled, draw_problem, loss_and_grads, rng_for
from test_matryoshka import _cpp_available, assert_matches_composition, composed, draw_dims, draw_weights
from test_ties import plant_ties

from gist_fast import backends
from gist_fast.backends import cpp_backend
from gist_fast.backends.common import has_one_pass_matryoshka
from gist_fast.inputs import validate

if not _cpp_available():
    pytest.skip("the C++ extension cannot be built here", allow_module_level=True)

ALWAYS, NEVER = 2**62, 0  # mask_limit_bytes: keep pass 1's guide-mask bits, or recompute in pass 2


def cpp_one_pass(tile_rows: int, tile_cols: int, mask_limit_bytes: int):
    """gist_loss_cpp called directly (the Matryoshka options reach it; no dispatcher composing)."""

    def loss_fn(a, p, ga, gp, n, gn, **options):
        inputs, opts = validate(a, p, ga, gp, n, gn, **options)
        return cpp_backend.gist_loss_cpp(
            inputs, opts, tile_rows=tile_rows, tile_cols=tile_cols, mask_limit_bytes=mask_limit_bytes
        )

    return loss_fn


def random_options(rng, **fixed) -> dict:
    return {key: rng.choice(values) for key, values in OPTION_GRID.items()} | fixed


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mask_limit", [ALWAYS, NEVER], ids=["mask-bits", "guide-recomputed"])
def test_small_tiles(reduction, mask_limit):
    """Tiles of 5 rows x 7 columns across B = 11 (AA, PP and 0-2 negative blocks), dims of a 70-wide
    student in random order and weights, float64 and float32."""
    rng = rng_for("matryoshka-cpp-tiles", reduction, mask_limit)
    problem = draw_problem(rng, 11, 70, 20, rng.choice([0, 1, 2]), options=random_options(rng, reduction=reduction))
    dims = draw_dims(rng, 70)
    weights = draw_weights(rng, dims)
    for dtype in (torch.float64, torch.float32):
        assert_matches_composition(cpp_one_pass(5, 7, mask_limit), problem, dims, weights, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("strategy", ["absolute", "relative"])
def test_planted_ties(dtype, strategy):
    """Exact ties (rows repeating other rows in student and guide) at margin 0 and a margin below
    float32's rounding: decided by guide row ids for every dim as by the reference."""
    for margin in (0.0, 1e-9 if strategy == "absolute" else 0.1):
        rng = rng_for("matryoshka-cpp-ties", dtype, strategy, margin)
        options = {"margin_strategy": strategy, "margin": margin, "temperature": 0.05, "reduction": "sum"}
        options |= {"contrast_anchors": True, "contrast_positives": True}
        problem = plant_ties(draw_problem(rng, 12, 40, 16, 1, options=options), rng)
        dims = (40, 17, 1)
        assert_matches_composition(cpp_one_pass(5, 7, ALWAYS), problem, dims, (1.0, 0.5, 2.0), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs(dtype):
    """Half inputs are upcast to float32; gradients come back in the input dtype."""
    rng = rng_for("matryoshka-cpp-half", dtype)
    problem = draw_problem(rng, 9, 70, 24, 1, options=random_options(rng))
    dims = draw_dims(rng, 70)
    assert_matches_composition(cpp_one_pass(4, 6, ALWAYS), problem, dims, draw_weights(rng, dims), dtype)


class _CountingExtension:
    """The compiled extension with its entry points' calls counted by name."""

    def __init__(self, extension) -> None:
        self.extension, self.calls = extension, []

    def __getattr__(self, name):
        function = getattr(self.extension, name)

        def counted(*args, **kwargs):
            self.calls.append(name)
            return function(*args, **kwargs)

        return counted


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backend_takes_the_one_pass_path(monkeypatch, reduction):
    """backend="cpp" is marked one-pass, and five dims take one Matryoshka forward and one backward
    kernel call (the dispatcher's composition took five plain ones each)."""
    assert has_one_pass_matryoshka(cpp_backend.gist_loss_cpp)
    counting = _CountingExtension(cpp_backend.load_extension())
    monkeypatch.setattr(cpp_backend, "_EXTENSION", counting)
    rng = rng_for("matryoshka-cpp-path", reduction)
    problem = draw_problem(rng, 6, 40, 8, 1, options=random_options(rng, reduction=reduction))
    student, guide = problem.args()
    inputs, opts = validate(student[0], student[1], guide[0], guide[1], student[2:], guide[2:], **problem.options,
                            matryoshka_dims=(40, 33, 17, 5, 1))  # fmt: skip
    backends.run("cpp", inputs, opts).sum().backward()
    assert counting.calls == ["forward_matryoshka", "backward_matryoshka"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_zero_prefix(dtype):
    """Rows whose first feature is 0 or 3e-10: dim 1's prefix norm is below eps = 1e-8 (clamped: its
    gradient takes the constant-norm branch, ~1/eps), while the wider dims of the same rows are
    ordinary. Loss, the first feature's gradients and the other features' gradients each within
    problems.TOLERANCES of the float64 composition, relative to their own largest magnitude. (The
    first feature's gradient is compared in float64 only: through dim 1 its exact value at the other
    rows is 0 and the float32 one is round-off over |x[:, 0]|, which the random draws make small.)"""
    rng = rng_for("matryoshka-cpp-zero-prefix", dtype)
    problem = draw_problem(rng, 9, 40, 12, 1, options=random_options(rng, reduction="sum", temperature=0.05))
    for t in problem.student:
        t[::4, 0] = 0.0  # dim 1's prefix norm is 0 ...
        t[2::4, 0] = 3e-10  # ... or below eps but not 0 (its projection is dropped, not 0 by itself)
    dims, weights = (1, 17, 40), (1.0, 0.5, 2.0)
    expected_loss, expected = composed(problem, dims, weights, dtype)
    loss, grads = loss_and_grads(cpp_one_pass(4, 6, NEVER), problem, dtype, matryoshka_dims=dims,
                                 matryoshka_weights=weights)  # fmt: skip
    tol = TOLERANCES[dtype]
    assert_close_scaled(loss, expected_loss, tol["loss"], "loss")
    for name, g, e in zip(["anchor", "positive", "negatives[0]"], grads, expected, strict=True):
        for features in (slice(0, 1), slice(1, None)) if dtype == torch.float64 else (slice(1, None),):
            assert_close_scaled(g[:, features], e[:, features], tol["grad"], f"grad {name}[:, {features}]")
