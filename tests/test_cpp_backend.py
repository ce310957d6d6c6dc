"""The native C++ CPU backend ("cpp") against the float64 oracle.

The extension is compiled on first use (about a minute on 2 cores, then cached on disk); when it
cannot be built here (no compiler, no ninja) every test is skipped with the reason. Tolerances are
those of test_loss.py (problems.TOLERANCES): float64 1e-9, float32 loss 2e-5 and gradients 1e-4,
relative to the largest magnitude of the compared tensor; half inputs are upcast to float32 by the
glue, so they get the float16/bfloat16 gradient tolerances of their output dtype.
"""

from __future__ import annotations

import functools

import pytest
import torch
from problems import (
    BATCHES,
    DIMS,
    NEGATIVE_COUNTS,
    assert_matches_oracle,
    draw_gathered,
    draw_problem,
    draw_random_problem,
    gathered_loss_and_grads,
    loss_and_grads,
    option_cross_product,
    rng_for,
)

import gist_fast
from gist_fast.inputs import validate


def _build_or_skip():
    try:
        from gist_fast.backends.cpp_backend import load_extension

        load_extension()
    except Exception as error:  # no compiler, no ninja, a failed build: say why
        pytest.skip(f"the C++ extension cannot be built here: {error}", allow_module_level=True)


_build_or_skip()

from gist_fast.backends.cpp_backend import gist_loss_cpp  # noqa: E402

cpp = functools.partial(gist_fast.gist_loss, backend="cpp")


DEFAULT_OPTIONS = dict(
    temperature=0.01, margin_strategy="absolute", margin=0.0, contrast_anchors=True, contrast_positives=True,
    reduction="mean",
)  # fmt: skip
ALWAYS, NEVER = 2**62, 0  # mask_limit_bytes: keep pass 1's guide-mask bits, or recompute in pass 2


def cpp_with_tiles(tile_rows: int, tile_cols: int, mask_limit_bytes: int | None = None):
    """The C++ backend with explicit (small) tiles, so that tile edges are crossed."""

    def loss_fn(a, p, ga, gp, n, gn, **options):
        options = {**DEFAULT_OPTIONS, **options}
        inputs, opts = validate(a, p, ga, gp, n, gn, **options)
        return gist_loss_cpp(inputs, opts, tile_rows=tile_rows, tile_cols=tile_cols, mask_limit_bytes=mask_limit_bytes)

    return loss_fn


@pytest.mark.parametrize("options", option_cross_product(), ids=lambda o: "-".join(str(v) for v in o.values()))
def test_option_cross_product_float64(options):
    rng = rng_for("cpp-options", options)
    problem = draw_problem(
        rng,
        rng.choice([2, 3, 17]),
        rng.choice([1, 7, 64]),
        rng.choice([5, 33]),
        rng.choice(NEGATIVE_COUNTS),
        options=options,
    )
    assert_matches_oracle(cpp_with_tiles(128, 512, ALWAYS), problem, torch.float64)
    assert_matches_oracle(cpp_with_tiles(2, 3, NEVER), problem, torch.float64)


@pytest.mark.parametrize("k", NEGATIVE_COUNTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_shapes_float32(batch, k):
    for dim in DIMS:
        rng = rng_for("cpp-shapes", batch, dim, k)
        guide_dim = rng.choice([g for g in DIMS if g not in (dim, 1)])
        options = {
            "margin": rng.choice([0.0, 0.05, 0.1, -0.1]),
            "margin_strategy": rng.choice(["absolute", "relative"]),
            "contrast_anchors": rng.random() < 0.5,
            "contrast_positives": rng.random() < 0.5,
        }
        problem = draw_problem(rng, batch, dim, guide_dim, k, options=options)
        assert_matches_oracle(cpp, problem, torch.float32)


@pytest.mark.parametrize("tiles", [(1, 1), (2, 3), (5, 7), (16, 40), (64, 8), (7, 70)])
@pytest.mark.parametrize("trial", range(4))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tile_edges(tiles, trial, dtype):
    """Tiles that do not divide B or N (nor 64, the width of a mask word), tiles smaller and larger
    than the batch; with and without pass 1's guide-mask bits."""
    rng = rng_for("cpp-tiles", tiles, trial, dtype)
    problem = draw_random_problem(rng, max_batch=17 if tiles[0] == 1 else 129)
    assert_matches_oracle(cpp_with_tiles(*tiles, ALWAYS if trial % 2 else NEVER), problem, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("trial", range(4))
def test_half_inputs_are_upcast(dtype, trial):
    rng = rng_for("cpp-dtype", dtype, trial)
    problem = draw_random_problem(rng)
    assert_matches_oracle(cpp, problem, dtype)


def test_mixed_dtypes_compute_in_the_widest():
    rng = rng_for("cpp-mixed")
    problem = draw_problem(rng, 9, 7, 5, 1, options={"reduction": "sum"})
    s, g = problem.args(torch.float32)
    s[2] = s[2].detach().double().requires_grad_()
    loss = gist_fast.gist_loss(s[0], s[1], g[0], g[1], s[2], g[2], backend="cpp", **problem.options)
    assert loss.dtype == torch.float64
    grads = torch.autograd.grad(loss, s)
    assert [t.dtype for t in grads] == [torch.float32, torch.float32, torch.float64]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("trial", range(3))
def test_gather_offset(world, trial):
    """Gathered candidates: P = W*B positives, anchors local, target column offset = rank*B."""
    rng = rng_for("cpp-offset", world, trial)
    batch = rng.choice([1, 3, 17])
    rank = rng.randrange(world)
    student, guide = draw_gathered(rng, batch, world, rank, 7, 5, rng.choice([0, 1, 2]))
    options = {
        "margin": rng.choice([0.0, 0.1]),
        "reduction": rng.choice(["none", "sum", "mean"]),
        "contrast_anchors": rng.random() < 0.5,
        "contrast_positives": rng.random() < 0.5,
    }

    def run(backend_fn, dtype):
        return gathered_loss_and_grads(
            backend_fn, student, guide, dtype, batch=batch, world=world, rank=rank, **options
        )

    from gist_fast.backends.reference import gist_loss_reference

    expected_loss, expected_grads = run(gist_loss_reference, torch.float64)
    for tiles, limit in [((2, 5), ALWAYS), ((128, 512), NEVER), ((3, 64), ALWAYS)]:
        fn = functools.partial(gist_loss_cpp, tile_rows=tiles[0], tile_cols=tiles[1], mask_limit_bytes=limit)
        loss, grads = run(fn, torch.float64)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-10)
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_gradcheck_float64(reduction):
    rng = rng_for("cpp-gradcheck", reduction)
    for k in (0, 2):
        problem = draw_problem(rng, 3, 4, 3, k, options={"temperature": 0.5, "reduction": reduction, "margin": 0.05})
        assert_matches_oracle(cpp, problem, torch.float64)
        student, guide = problem.args(torch.float64)

        def fn(*s, guide=guide, options=problem.options):
            return gist_fast.gist_loss(
                s[0], s[1], guide[0], guide[1], list(s[2:]) or None, guide[2:] or None, **options, backend="cpp"
            )

        assert torch.autograd.gradcheck(fn, tuple(student), eps=1e-6, atol=1e-7)


def test_retain_graph_backward_twice_is_unchanged():
    rng = rng_for("cpp-retain")
    problem = draw_problem(rng, 6, 5, 4, 1, options={"reduction": "none"})
    s, g = problem.args(torch.float64)
    loss = gist_fast.gist_loss(s[0], s[1], g[0], g[1], s[2], g[2], reduction="none", backend="cpp")
    weight = torch.randn_like(loss)
    first = torch.autograd.grad(loss, s, weight, retain_graph=True)
    second = torch.autograd.grad(loss, s, weight)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_double_backward_is_refused():
    rng = rng_for("cpp-double")
    problem = draw_problem(rng, 4, 5, 3, 0)
    s, g = problem.args(torch.float64)
    loss = gist_fast.gist_loss(s[0], s[1], g[0], g[1], backend="cpp")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, [s[0]], create_graph=True)
    (grad,) = torch.autograd.grad(loss, [s[0]])  # a plain backward still works afterwards
    assert torch.isfinite(grad).all()


def test_deterministic_and_independent_of_thread_count():
    rng = rng_for("cpp-determinism")
    problem = draw_problem(rng, 129, 64, 33, 2, options={"reduction": "sum"})
    run = functools.partial(loss_and_grads, cpp_with_tiles(16, 40), problem, torch.float32)
    threads = torch.get_num_threads()
    first, again = run(), run()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for other in (again, single):
        assert torch.equal(first[0], other[0])
        for a, b in zip(first[1], other[1], strict=True):
            assert torch.equal(a, b)


# --- the cases of docs/loss.md --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tie_with_threshold_is_kept(dtype):
    a, p, n = torch.randn(3, 4, 5, dtype=dtype).unbind(0)
    g = torch.eye(4, dtype=dtype)[[0, 0, 0, 0]]  # identical unit vectors: every guide dot is exactly 1
    kw = dict(reduction="none", temperature=1.0, backend="cpp")
    tie = gist_fast.gist_loss(a, p, g, g, n, g, margin=0.0, **kw)
    cos = lambda x, y: torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(y, dim=1).T  # noqa: E731
    logits = torch.cat([cos(a, p), cos(a, a), cos(p, p), cos(a, n)], dim=1)
    torch.testing.assert_close(tie, torch.logsumexp(logits, dim=1) - cos(a, p).diagonal())
    masked = gist_fast.gist_loss(a, p, g, g, n, g, margin=0.25, **kw)
    torch.testing.assert_close(masked, torch.zeros_like(masked))


def test_relative_margin_with_negative_positive_similarity():
    ga = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    gp = torch.tensor([[-0.6, 0.8]], dtype=torch.float64)  # t = -0.6, thr = -0.66
    a, p, n = torch.randn(3, 1, 3, dtype=torch.float64).unbind(0)
    kw = dict(
        margin_strategy="relative", margin=0.1, contrast_anchors=False, contrast_positives=False, temperature=1.0,
        backend="cpp",
    )  # fmt: skip
    for g, masked in [(0.0, True), (-1.0, False), (-0.65, True), (-0.67, False)]:
        gn = torch.tensor([[g, (1 - g * g) ** 0.5]], dtype=torch.float64)
        loss = gist_fast.gist_loss(a, p, ga, gp, n, gn, **kw)
        assert (loss.item() == pytest.approx(0.0, abs=1e-12)) == masked


def test_everything_masked_but_the_target_gives_zero():
    """Guide finds every candidate identical to the anchor: whole tiles are masked, loss = 0."""
    a, p, n = torch.randn(3, 40, 4, dtype=torch.float64).unbind(0)
    g = torch.ones(40, 3, dtype=torch.float64)
    for tiles in [(3, 5), (128, 512)]:
        inputs, opts = validate(
            a, p, g, g, n, g, temperature=0.01, margin_strategy="absolute", margin=0.01,
            contrast_anchors=True, contrast_positives=True, reduction="none",
        )  # fmt: skip
        loss = gist_loss_cpp(inputs, opts, tile_rows=tiles[0], tile_cols=tiles[1])
        torch.testing.assert_close(loss, torch.zeros(40, dtype=torch.float64))


def test_extreme_logits_float32():
    """temperature 0.01 and a target far below the other candidates: the online shift moves by
    ~200 and weights underflow; loss and gradients stay finite and match the oracle."""
    rng = rng_for("cpp-extreme")
    problem = draw_problem(rng, 33, 16, 8, 1, options={"temperature": 0.01, "reduction": "none", "margin": 0.5})
    problem.student[1] = -problem.student[0] + 0.01 * problem.student[1]  # target cosine ~ -1
    assert_matches_oracle(cpp_with_tiles(4, 8), problem, torch.float32)
    assert_matches_oracle(cpp, problem, torch.float64)


# --- API surface ------------------------------------------------------------------------------


def test_non_contiguous_inputs():
    rng = rng_for("cpp-noncontig")
    problem = draw_problem(rng, 6, 8, 5, 1)
    s, g = problem.args(torch.float32, requires_grad=False)
    wide = [torch.cat([t, torch.randn_like(t)], 1)[:, ::2] for t in s]
    for t, w in zip(s, wide, strict=True):
        w.copy_(t)
    transposed = [t.T.contiguous().T for t in g]
    assert not wide[0].is_contiguous() and not transposed[0].is_contiguous()
    expected = gist_fast.gist_loss(s[0], s[1], g[0], g[1], s[2], g[2], backend="cpp")
    got = gist_fast.gist_loss(wide[0], wide[1], transposed[0], transposed[1], wide[2], transposed[2], backend="cpp")
    torch.testing.assert_close(got, expected)


def test_inputs_not_modified_and_only_requested_grads():
    rng = rng_for("cpp-inplace")
    problem = draw_problem(rng, 7, 6, 4, 2)
    s, g = problem.args(torch.float64, requires_grad=False)
    s[1].requires_grad_()
    before = [t.detach().clone() for t in s + g]
    loss = gist_fast.gist_loss(s[0], s[1], g[0], g[1], s[2:], g[2:], backend="cpp")
    (grad,) = torch.autograd.grad(loss, [s[1]])
    for t, b in zip(s + g, before, strict=True):
        assert torch.equal(t.detach(), b)
    ref_s, _ = problem.args(torch.float64)
    ref = gist_fast.gist_loss(ref_s[0], ref_s[1], g[0], g[1], ref_s[2:], g[2:], backend="reference")
    torch.testing.assert_close(grad, torch.autograd.grad(ref, [ref_s[1]])[0])
    with torch.no_grad():
        assert torch.equal(gist_fast.gist_loss(s[0], s[1], g[0], g[1], s[2:], g[2:], backend="cpp"), loss.detach())


def test_extension_available_and_missing_compiler_is_explained(monkeypatch):
    from gist_fast.backends import cpp_backend

    assert cpp_backend.extension_available()
    monkeypatch.setattr(cpp_backend, "_EXTENSION", None)
    monkeypatch.setenv("CXX", "no-such-compiler-gist-fast")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        cpp_backend.load_extension()
    assert not cpp_backend.extension_available()


def test_bad_tiles_and_devices_are_refused():
    inputs, opts = validate(
        *torch.randn(4, 2, 3).unbind(0), None, None, temperature=0.1, margin_strategy="absolute", margin=0.0,
        contrast_anchors=True, contrast_positives=True, reduction="mean",
    )  # fmt: skip
    with pytest.raises(ValueError, match="tile"):
        gist_loss_cpp(inputs, opts, tile_rows=0)
