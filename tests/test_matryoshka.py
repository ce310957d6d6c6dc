"""The Matryoshka GIST loss (``matryoshka_dims``) against the composition of single-dim losses.

The oracle is ``sum_m w_m * gist_loss(student[..., :m]; guide, backend="reference")`` in float64,
one plain reference call per dim on sliced inputs: it shares no code with the one-pass paths. Every
backend runs on random problems (random options, reductions including "none", 0-2 negative
columns, random weights) whose dims always include d itself and 1 and otherwise widths that are no
multiple of any tile or block width (7, 17, 33, 65, ...). Tolerances are problems.TOLERANCES (float64
1e-9, float32 loss 2e-5 and gradients 1e-4, relative to the largest magnitude of the compared
tensor), the floors scaled by the sum of |w_m| (the composed loss adds up that many losses' round-off).
Triton runs under its interpreter on the CPU (conftest.py) in float32.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
from problems import (
    OPTION_GRID,
    TOLERANCES,
    Problem,
    assert_close_scaled,
    draw_gathered,
    draw_problem,
    gradient_floor,
    loss_and_grads,
    rng_for,
    upstream_weight,
)

import gist_fast
from gist_fast import backends
from gist_fast.backends.common import has_one_pass_matryoshka
from gist_fast.inputs import validate

HAS_TRITON = importlib.util.find_spec("triton") is not None

# Feature widths that are no multiple of 16 or 32 (Triton's BLOCK_K, the C++ kernel's vector width).
ODD_DIMS = (2, 7, 17, 33, 65, 100)


@functools.cache
def _cpp_available() -> bool:
    try:
        from gist_fast.backends.cpp_backend import load_extension

        load_extension()
        return True
    except Exception:  # no compiler / ninja here: the cpp cases are skipped
        return False


def backend_param(name: str):
    marks = []
    if name.startswith("triton") and not HAS_TRITON:
        marks.append(pytest.mark.skip(reason="triton is not installed"))
    return pytest.param(name, marks=marks, id=name)


BACKENDS = [backend_param(name) for name in ("reference", "torch", "cpp", "triton", "triton_chunked")]


def skip_unavailable(backend: str) -> None:
    if backend == "cpp" and not _cpp_available():
        pytest.skip("the C++ extension cannot be built here")


def dtypes_for(backend: str) -> list[torch.dtype]:
    # Triton kernels take no float64; the others are checked in float64 (exact to round-off) and float32.
    return [torch.float32] if backend.startswith("triton") else [torch.float64, torch.float32]


def draw_dims(rng, dim: int) -> tuple[int, ...]:
    """d itself, 1 (when d > 1), and up to three more distinct widths in between, odd ones first."""
    dims = {dim, 1}
    inside = [m for m in ODD_DIMS if m < dim] + [m for m in range(2, dim) if m not in ODD_DIMS]
    rng.shuffle(inside)
    dims.update(inside[: rng.randint(0, 3)])
    order = list(dims)
    rng.shuffle(order)  # any order: the loss is a sum over dims
    return tuple(order)


def draw_weights(rng, dims: tuple[int, ...]) -> tuple[float, ...] | None:
    if rng.random() < 0.3:
        return None  # the default: all 1
    return tuple(rng.choice([0.25, 0.5, 1.0, 2.0, 3.0]) for _ in dims)


def composed(problem: Problem, dims, weights, dtype=torch.float64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The oracle: one plain reference loss per dim on sliced inputs, weighted and summed."""
    weights = weights or (1.0,) * len(dims)

    def loss_fn(a, p, ga, gp, n, gn, **options):
        total = 0.0
        for m, w in zip(dims, weights, strict=True):
            sliced = None if n is None else [t[:, :m] for t in n]
            total = total + w * gist_fast.gist_loss(
                a[:, :m], p[:, :m], ga, gp, sliced, gn, backend="reference", **options
            )
        return total

    rounded = Problem([t.to(dtype).double() for t in problem.student], [t.to(dtype).double() for t in problem.guide],
                      problem.options)  # fmt: skip
    return loss_and_grads(loss_fn, rounded, torch.float64)


def assert_matches_composition(loss_fn, problem: Problem, dims, weights, dtype: torch.dtype) -> None:
    expected_loss, expected_grads = composed(problem, dims, weights, dtype)
    loss, grads = loss_and_grads(loss_fn, problem, dtype, matryoshka_dims=dims, matryoshka_weights=weights)
    tol = TOLERANCES[dtype]
    total_weight = sum(abs(w) for w in (weights or (1.0,) * len(dims)))
    context = f"{problem.describe()} dims={dims} weights={weights} dtype={dtype}"
    logit_scale = 1.0 / problem.options.get("temperature", 0.01)
    summed_rows = problem.student[0].shape[0] if problem.options.get("reduction") == "sum" else 1
    loss_floor = 0.1 * logit_scale * summed_rows * total_weight
    assert loss.shape == expected_loss.shape, context
    assert_close_scaled(loss, expected_loss, tol["loss"], f"loss [{context}]", floor=loss_floor)
    upstream = upstream_weight(problem).abs().max().item()
    names = ["anchor", "positive"] + [f"negatives[{m}]" for m in range(problem.k)]
    for name, g, e, t in zip(names, grads, expected_grads, problem.student, strict=True):
        assert g.dtype == dtype and g.shape == t.shape, f"grad {name} [{context}]"
        # The smallest prefix's norm sets the normalisation's round-off: take the floor from it.
        smallest = min(dims)
        floor = gradient_floor(problem, t[:, :smallest], upstream) * total_weight
        assert_close_scaled(g, e, tol["grad"], f"grad {name} [{context}]", floor=floor)


def draw_matryoshka_problem(rng, *, max_batch: int, dims=(1, 7, 40, 70)) -> Problem:
    batch = rng.choice([b for b in (1, 2, 3, 9, 17, 33) if b <= max_batch])
    dim = rng.choice(dims)
    options = {key: rng.choice(values) for key, values in OPTION_GRID.items()}
    return draw_problem(rng, batch, dim, rng.choice([5, 24, 48]), rng.choice([0, 1, 2]), options=options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("draw", range(4))
def test_matches_composition_of_single_dim_losses(backend, draw):
    skip_unavailable(backend)
    rng = rng_for("matryoshka", backend, draw)
    interpreted = backend.startswith("triton")
    problem = draw_matryoshka_problem(rng, max_batch=9 if interpreted else 33)
    dims = draw_dims(rng, problem.student[0].shape[1])
    weights = draw_weights(rng, dims)
    loss_fn = functools.partial(gist_fast.gist_loss, backend=backend)
    for dtype in dtypes_for(backend):
        assert_matches_composition(loss_fn, problem, dims, weights, dtype)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_many_dims_crossing_tiles(backend):
    """B and d large enough that the C++ kernel's tiles and vector widths are crossed in rows,
    columns and features; dims that split feature blocks unevenly. (The interpreted Triton kernels
    take 16-wide blocks, which the random draws above already cross.)"""
    skip_unavailable(backend)
    rng = rng_for("matryoshka-tiles", backend)
    options = {key: rng.choice(values) for key, values in OPTION_GRID.items()} | {"reduction": "none"}
    problem = draw_problem(rng, 37, 130, 33, 1, options=options)
    dims, weights = (130, 97, 65, 64, 31, 1), (1.0, 0.5, 2.0, 1.0, 0.25, 1.5)
    loss_fn = functools.partial(gist_fast.gist_loss, backend=backend)
    assert_matches_composition(loss_fn, problem, dims, weights, dtypes_for(backend)[0])


def test_torch_backend_small_tiles():
    """The one-pass torch path with tiles smaller than the batch, all reductions."""
    from gist_fast.backends.torch_tiled import gist_loss_torch

    rng = rng_for("matryoshka-torch-tiles")
    for reduction in ("mean", "sum", "none"):
        options = {key: rng.choice(values) for key, values in OPTION_GRID.items()} | {"reduction": reduction}
        problem = draw_problem(rng, 11, 24, 20, rng.choice([0, 1, 2]), options=options)
        dims = draw_dims(rng, 24)

        def loss_fn(a, p, ga, gp, n, gn, **opts):
            inputs, parsed = validate(a, p, ga, gp, n, gn, **opts)
            return gist_loss_torch(inputs, parsed, tile_rows=5, tile_cols=7)

        assert_matches_composition(loss_fn, problem, dims, draw_weights(rng, dims), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gathered_candidates(backend):
    """The offset of a gathered batch (rank 1 of 3): targets at rank * B, P = 3B candidates."""
    skip_unavailable(backend)
    rng = rng_for("matryoshka-gather", backend)
    batch, world, rank, dim = 5, 3, 1, 40
    student, guide = draw_gathered(rng, batch, world, rank, dim, 24, 1)
    dims, weights = (40, 17, 1), (1.0, 0.5, 2.0)
    dtype = dtypes_for(backend)[0]
    options = {
        "temperature": 0.05,
        "margin": 0.05,
        "reduction": "sum",
        "margin_strategy": "relative",
        "contrast_anchors": True,
        "contrast_positives": True,
    }

    def run(fn, s, g, **extra):
        s = [t.to(dtype).requires_grad_() for t in s]
        g = [t.to(dtype) for t in g]
        inputs, opts = validate(
            s[0], s[1], g[0], g[1], s[2:], g[2:], offset=rank * batch, expected_candidates=batch * world,
            **options, **extra,
        )  # fmt: skip
        loss = fn(inputs, opts)
        return loss, torch.autograd.grad(loss, s)

    loss, grads = run(lambda i, o: backends.run(backend, i, o), student, guide,
                      matryoshka_dims=dims, matryoshka_weights=weights)  # fmt: skip
    reference = backends.get_backend("reference", None)
    expected_loss, expected_grads = 0.0, [0.0] * len(student)
    for m, w in zip(dims, weights, strict=True):
        l_m, g_m = run(reference, [t[:, :m].double() for t in student], [t.double() for t in guide])
        expected_loss = expected_loss + w * l_m
        expected_grads = [
            e + w * torch.nn.functional.pad(g, (0, dim - m)) for e, g in zip(expected_grads, g_m, strict=True)
        ]
    tol, total_weight, logit_scale = TOLERANCES[dtype], sum(weights), 1.0 / options["temperature"]
    assert_close_scaled(
        loss, expected_loss, tol["loss"], "gathered loss", floor=0.1 * logit_scale * batch * total_weight
    )
    for g, e, t in zip(grads, expected_grads, student, strict=True):
        inv_norm = 1.0 / t[:, :1].norm(dim=1).min().item()  # the smallest prefix's round-off
        floor = 5e-2 * logit_scale * inv_norm * batch * total_weight
        assert_close_scaled(g, e, tol["grad"], "gathered grad", floor=floor)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_single_full_dim_is_the_plain_loss(backend):
    """matryoshka_dims=(d,) is the plain loss, value and gradients."""
    rng = rng_for("matryoshka-plain", backend)
    problem = draw_problem(rng, 9, 12, 7, 1, options={"reduction": "none", "margin": 0.05})
    loss_fn = functools.partial(gist_fast.gist_loss, backend=backend)
    plain_loss, plain_grads = loss_and_grads(loss_fn, problem, torch.float64)
    loss, grads = loss_and_grads(loss_fn, problem, torch.float64, matryoshka_dims=[12])
    torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_module_takes_the_options():
    rng = rng_for("matryoshka-module")
    problem = draw_problem(rng, 6, 10, 8, 0, options={"temperature": 0.1, "reduction": "mean"})
    s, g = problem.args()
    criterion = gist_fast.GISTLoss(temperature=0.1, matryoshka_dims=(10, 3), matryoshka_weights=(1.0, 0.5))
    assert "matryoshka_dims=(10, 3)" in repr(criterion)
    expected, _ = composed(problem, (10, 3), (1.0, 0.5))
    torch.testing.assert_close(criterion(s[0], s[1], g[0], g[1]).detach(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"matryoshka_dims": ()}, ValueError, "matryoshka_dims .*at least one"),
        ({"matryoshka_dims": (0,)}, ValueError, r"matryoshka_dims entries must lie in \[1, 8\]"),
        ({"matryoshka_dims": (9,)}, ValueError, r"matryoshka_dims entries must lie in \[1, 8\]"),
        ({"matryoshka_dims": (-4,)}, ValueError, "matryoshka_dims"),
        ({"matryoshka_dims": (4, 4)}, ValueError, "matryoshka_dims must be distinct"),
        ({"matryoshka_dims": (4.0,)}, TypeError, "matryoshka_dims must hold ints"),
        ({"matryoshka_dims": (True,)}, TypeError, "matryoshka_dims must hold ints"),
        ({"matryoshka_dims": 4}, TypeError, "matryoshka_dims must be a sequence"),
        ({"matryoshka_dims": "84"}, TypeError, "matryoshka_dims must be a sequence"),
        ({"matryoshka_weights": (1.0,)}, ValueError, "matryoshka_weights was given without matryoshka_dims"),
        ({"matryoshka_dims": (8, 4), "matryoshka_weights": (1.0,)}, ValueError, "matryoshka_weights has 1 entries"),
        ({"matryoshka_dims": (8,), "matryoshka_weights": (float("nan"),)}, ValueError, "matryoshka_weights must hold"),
        ({"matryoshka_dims": (8,), "matryoshka_weights": (float("inf"),)}, ValueError, "matryoshka_weights must hold"),
        ({"matryoshka_dims": (8,), "matryoshka_weights": ("1",)}, ValueError, "matryoshka_weights must hold"),
        ({"matryoshka_dims": (8,), "matryoshka_weights": 1.0}, TypeError, "matryoshka_weights must be a sequence"),
    ],
)
def test_bad_dims_and_weights_are_named(kwargs, error, match):
    a, p = torch.randn(2, 4, 8).unbind(0)
    ga, gp = torch.randn(2, 4, 6).unbind(0)
    with pytest.raises(error, match=match):
        gist_fast.gist_loss(a, p, ga, gp, **kwargs)
    with pytest.raises(error, match=match):
        gist_fast.GISTLoss(**kwargs)(a, p, ga, gp)


def test_one_pass_backends_are_marked():
    """The backends that compute every dim in one pass say so (the dispatcher composes the others)."""
    from gist_fast.backends.reference import gist_loss_reference
    from gist_fast.backends.torch_tiled import gist_loss_torch

    assert has_one_pass_matryoshka(gist_loss_reference)
    assert has_one_pass_matryoshka(gist_loss_torch)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_guide_mask_once_per_tile_for_all_dims(monkeypatch, reduction):
    """The torch one-pass path forms each tile's guide mask once, however many dims: as many mask
    tiles for five dims as for one, and as the plain loss forms."""
    from gist_fast.backends import torch_matryoshka, torch_tiled

    counted = []
    for module in (torch_matryoshka, torch_tiled):
        real = module.guide_mask
        monkeypatch.setattr(module, "guide_mask", lambda *a, real=real: counted.append(1) or real(*a))
    rng = rng_for("matryoshka-mask-once")
    # temperature 0.1: logits within 20 of each other, so no tile takes the rare re-shift path
    options = {key: rng.choice(values) for key, values in OPTION_GRID.items()}
    problem = draw_problem(rng, 13, 40, 12, 1, options=options | {"reduction": reduction, "temperature": 0.1})

    def mask_tiles(**extra) -> int:
        counted.clear()
        student, guide = problem.args()
        inputs, opts = validate(student[0], student[1], guide[0], guide[1], student[2:], guide[2:], **problem.options,
                                **extra)  # fmt: skip
        loss = backends.run("torch", inputs, opts)  # what gist_loss(backend="torch") runs
        loss.sum().backward()
        return len(counted)

    plain = mask_tiles()
    assert plain > 0
    assert mask_tiles(matryoshka_dims=(40,)) == plain
    assert mask_tiles(matryoshka_dims=(40, 33, 17, 5, 1)) == plain


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    """Half inputs are upcast to float32 by the one-pass paths; gradients come back in the input
    dtype, within problems.TOLERANCES of the float64 composition on the rounded inputs."""
    rng = rng_for("matryoshka-half", backend, str(dtype))
    options = {key: rng.choice(values) for key, values in OPTION_GRID.items()}
    problem = draw_problem(rng, 9, 70, 24, 1, options=options)
    dims = draw_dims(rng, 70)
    loss_fn = functools.partial(gist_fast.gist_loss, backend=backend)
    assert_matches_composition(loss_fn, problem, dims, draw_weights(rng, dims), dtype)
