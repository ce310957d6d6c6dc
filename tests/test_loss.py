"""The GIST loss of every CPU backend against the float64 oracle, across options, shapes and dtypes.

Tolerances (relative to the largest magnitude of the compared tensor; see problems.TOLERANCES):
float64 1e-9; float32 loss 2e-5, gradients 1e-4; float16 loss 2e-5, gradients 2e-3; bfloat16 loss
2e-5, gradients 1.6e-2. The oracle runs on the inputs rounded to the tested dtype, so only the
backend's own arithmetic is measured. Guide decisions with |g - thr| below the guide's rounding
error may differ between precisions; random inputs essentially never land there. Ties between
bitwise-equal guide rows are decided exactly on every backend (tests/test_ties.py).
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
from gist_fast.backends.torch_tiled import gist_loss_torch
from gist_fast.inputs import GISTOptions, validate

CPU_BACKENDS = ["reference", "torch"]


def public(backend: str):
    return functools.partial(gist_fast.gist_loss, backend=backend)


def torch_with_tiles(tile_rows: int, tile_cols: int):
    """The tiled backend with explicit (small) tiles, so that tile edges are crossed."""

    def loss_fn(a, p, ga, gp, n, gn, **options):
        inputs, opts = validate(a, p, ga, gp, n, gn, **options)
        return gist_loss_torch(inputs, opts, tile_rows=tile_rows, tile_cols=tile_cols)

    return loss_fn


@pytest.mark.parametrize("options", option_cross_product(), ids=lambda o: "-".join(str(v) for v in o.values()))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_option_cross_product_float64(backend, options):
    rng = rng_for("options", backend, options)
    problem = draw_problem(
        rng,
        rng.choice([2, 3, 17]),
        rng.choice([1, 7, 64]),
        rng.choice([5, 33]),
        rng.choice(NEGATIVE_COUNTS),
        options=options,
    )
    assert_matches_oracle(public(backend), problem, torch.float64)


@pytest.mark.parametrize("k", NEGATIVE_COUNTS)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("batch", BATCHES)
def test_shapes_float32(batch, dim, k):
    rng = rng_for("shapes", batch, dim, k)
    # A guide dim of 1 makes every guide cosine +-1: ties in exact arithmetic between rows that are
    # not bitwise equal, so decided by rounding (docs/loss.md).
    guide_dim = rng.choice([g for g in DIMS if g not in (dim, 1)])
    options = {key: rng.choice(values) for key, values in [("margin", [0.0, 0.05, 0.1, -0.1])]}
    options["margin_strategy"] = rng.choice(["absolute", "relative"])
    options["contrast_anchors"] = rng.random() < 0.5
    options["contrast_positives"] = rng.random() < 0.5
    problem = draw_problem(rng, batch, dim, guide_dim, k, options=options)
    for backend in CPU_BACKENDS:
        assert_matches_oracle(public(backend), problem, torch.float32)


@pytest.mark.parametrize("tiles", [(1, 1), (2, 3), (5, 7), (16, 40)])
@pytest.mark.parametrize("trial", range(6))
def test_tile_edges(tiles, trial):
    """Tiles that do not divide B or N, tiles smaller and larger than the batch."""
    rng = rng_for("tiles", tiles, trial)
    problem = draw_random_problem(rng, max_batch=17 if tiles[0] == 1 else 64)
    assert_matches_oracle(torch_with_tiles(*tiles), problem, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("trial", range(8))
def test_low_precision(dtype, trial):
    rng = rng_for("dtype", dtype, trial)
    problem = draw_random_problem(rng)
    assert_matches_oracle(public("torch"), problem, dtype)
    assert_matches_oracle(torch_with_tiles(16, 24), problem, dtype)


@pytest.mark.parametrize("offset_blocks", [1, 2])
@pytest.mark.parametrize("trial", range(4))
def test_gather_offset(offset_blocks, trial):
    """Gathered candidates: P = W*B positives, anchors local, target column offset = rank*B."""
    rng = rng_for("offset", offset_blocks, trial)
    batch, world = rng.choice([1, 3, 17]), offset_blocks + 1 + rng.choice([0, 1])
    rank = offset_blocks
    student, guide = draw_gathered(rng, batch, world, rank, 7, 5, rng.choice([0, 1, 2]))
    options = {key: rng.choice(values) for key, values in [("margin", [0.0, 0.1]), ("reduction", ["none", "sum"])]}
    options.update(contrast_anchors=rng.random() < 0.5, contrast_positives=rng.random() < 0.5)

    def run(backend_fn, dtype):
        return gathered_loss_and_grads(
            backend_fn, student, guide, dtype, batch=batch, world=world, rank=rank, **options
        )

    from gist_fast.backends.reference import gist_loss_reference

    expected_loss, expected_grads = run(gist_loss_reference, torch.float64)
    for rows, cols in [(2, 5), (1024, 2048)]:
        tiled = functools.partial(gist_loss_torch, tile_rows=rows, tile_cols=cols)
        loss, grads = run(tiled, torch.float64)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-10)
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_offset_reference_against_manual_rows():
    """The reference's offset path equals the spec evaluated row by row (AP + AN blocks)."""
    rng = rng_for("manual-offset")
    batch, world, rank = 3, 3, 1
    base = draw_problem(rng, batch * world, 6, 4, 1)
    a = base.student[0][rank * batch : (rank + 1) * batch]
    ga = base.guide[0][rank * batch : (rank + 1) * batch]
    p, n = base.student[1], base.student[2]
    gp, gn = base.guide[1], base.guide[2]
    inputs, opts = validate(
        a, p, ga, gp, n, gn, temperature=0.1, margin_strategy="absolute", margin=0.0,
        contrast_anchors=False, contrast_positives=False, reduction="none",
        offset=rank * batch, expected_candidates=batch * world,
    )  # fmt: skip
    from gist_fast.backends.reference import gist_loss_reference

    got = gist_loss_reference(inputs, opts)
    cos = torch.nn.functional.cosine_similarity
    for i in range(batch):
        target = rank * batch + i
        t = cos(ga[i], gp[target], dim=0)
        logits = []
        for cols, gcols in [(p, gp), (n, gn)]:
            for j in range(cols.shape[0]):
                masked = cos(ga[i], gcols[j], dim=0) > t and not (cols is p and j == target)
                logits.append(float("-inf") if masked else cos(a[i], cols[j], dim=0).item() / 0.1)
        logits = torch.tensor(logits, dtype=torch.float64)
        want = torch.logsumexp(logits, 0) - logits[target]
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend, reduction):
    rng = rng_for("gradcheck", backend, reduction)
    for k in (0, 2):
        problem = draw_problem(rng, 3, 4, 3, k, options={"temperature": 0.5, "reduction": reduction, "margin": 0.05})
        student, guide = problem.args(torch.float64)

        def fn(*s, guide=guide, options=problem.options):
            return gist_fast.gist_loss(
                s[0], s[1], guide[0], guide[1], list(s[2:]) or None, guide[2:] or None,
                **options, backend=backend,
            )  # fmt: skip

        assert torch.autograd.gradcheck(fn, tuple(student), eps=1e-6, atol=1e-7)


# --- the cases of docs/loss.md --------------------------------------------------------------


def _basis(*indices: int, dim: int = 4) -> torch.Tensor:
    """Rows of the identity: exactly representable unit vectors, exact dot products."""
    return torch.eye(dim, dtype=torch.float64)[list(indices)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tie_with_threshold_is_kept(backend, dtype):
    """Every guide similarity equals t_i = 1 exactly: with margin 0 each is a tie and is kept, so the
    loss is the unmasked cross-entropy; with margin 0.25 all but the target are masked: loss 0."""
    a, p, n = torch.randn(3, 4, 5, dtype=dtype).unbind(0)
    g = _basis(0, 0, 0, 0).to(dtype)  # identical unit vectors: every dot product is exactly 1
    kw = dict(reduction="none", temperature=1.0, backend=backend)
    tie = gist_fast.gist_loss(a, p, g, g, n, g, margin=0.0, **kw)
    cos = lambda x, y: torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(y, dim=1).T  # noqa: E731
    logits = torch.cat([cos(a, p), cos(a, a), cos(p, p), cos(a, n)], dim=1)
    unmasked = torch.logsumexp(logits, dim=1) - cos(a, p).diagonal()
    torch.testing.assert_close(tie, unmasked)
    masked = gist_fast.gist_loss(a, p, g, g, n, g, margin=0.25, **kw)
    torch.testing.assert_close(masked, torch.zeros_like(masked))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_relative_margin_with_negative_positive_similarity(backend):
    """t_i < 0: thr = t - |t|*margin still masks candidates the guide finds closer than the positive."""
    ga = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    gp = torch.tensor([[-0.6, 0.8]], dtype=torch.float64)  # t = -0.6
    gn_closer = torch.tensor([[0.0, 1.0]], dtype=torch.float64)  # g = 0 > thr
    gn_farther = torch.tensor([[-1.0, 0.0]], dtype=torch.float64)  # g = -1 < thr
    a, p, n = torch.randn(3, 1, 3, dtype=torch.float64).unbind(0)
    kw = dict(
        margin_strategy="relative", margin=0.1, contrast_anchors=False, contrast_positives=False, temperature=1.0,
        backend=backend,
    )  # fmt: skip
    only_target = gist_fast.gist_loss(a, p, ga, gp, n, gn_closer, **kw)
    assert only_target.item() == pytest.approx(0.0, abs=1e-12)  # the negative is masked
    kept = gist_fast.gist_loss(a, p, ga, gp, n, gn_farther, **kw)
    assert kept.item() > 0.0
    # thr = -0.6 - 0.06 = -0.66: a guide similarity of -0.65 is masked, -0.67 kept.
    for g, masked in [(-0.65, True), (-0.67, False)]:
        gn = torch.tensor([[g, (1 - g * g) ** 0.5]], dtype=torch.float64)
        loss = gist_fast.gist_loss(a, p, ga, gp, n, gn, **kw)
        assert (loss.item() == pytest.approx(0.0, abs=1e-12)) == masked


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_anchor_equal_to_positive(backend):
    """a_i == p_i: the target logit is 1/tau, the loss stays finite and matches the oracle. When the
    guide too sees identical texts, the AA and PP diagonals tie with t_i exactly (bitwise-equal guide
    rows, decided exactly: tests/test_ties.py); here the guide case uses a margin that masks them."""
    rng = rng_for("anchor-eq-positive", backend)
    problem = draw_problem(rng, 9, 8, 6, 1, options={"reduction": "none", "temperature": 0.01})
    problem.student[1] = problem.student[0].clone() * 3.0
    assert_matches_oracle(public(backend), problem, torch.float64)
    assert_matches_oracle(public(backend), problem, torch.float32)
    problem.guide[1] = problem.guide[0].clone()
    problem.options["margin"] = 0.05
    assert_matches_oracle(public(backend), problem, torch.float64)
    loss, _ = loss_and_grads(public(backend), problem, torch.float64)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_self_entries_of_aa_and_pp_masked_by_guide_rule(backend):
    """The diagonal of AA and PP has guide similarity 1 > thr, so it is masked; with a margin
    below -(1 - t) the threshold exceeds 1 and nothing is masked, the diagonal included."""
    a = torch.randn(4, 6, dtype=torch.float64)
    p = torch.randn(4, 6, dtype=torch.float64)
    ga, gp = _basis(0, 1, 2, 3), _basis(0, 1, 2, 3)  # t_i = 1, off-diagonal guide sims 0
    kw = dict(reduction="none", temperature=0.1, backend=backend)
    z = lambda x, y: (torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(y, dim=1).T) / 0.1  # noqa: E731

    got = gist_fast.gist_loss(a, p, ga, gp, **kw)
    ap, aa, pp = z(a, p), z(a, a), z(p, p)
    # Off-diagonal guide sims are 0 <= thr = 1: kept. Diagonals have g = 1 = thr: kept (tie).
    want = torch.logsumexp(torch.cat([ap, aa, pp], 1), 1) - ap.diagonal()
    torch.testing.assert_close(got, want)

    # margin 0.5: thr = 0.5; diagonals of AA and PP (g = 1) are masked, AP's target is not.
    got = gist_fast.gist_loss(a, p, ga, gp, margin=0.5, **kw)
    eye = torch.eye(4, dtype=torch.bool)
    want = (
        torch.logsumexp(torch.cat([ap, aa.masked_fill(eye, float("-inf")), pp.masked_fill(eye, float("-inf"))], 1), 1)
        - ap.diagonal()
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_everything_masked_but_the_target_gives_zero(backend):
    """Guide finds every candidate identical to the anchor: only the target survives, loss = 0."""
    a, p, n = torch.randn(3, 5, 4, dtype=torch.float64).unbind(0)
    g = torch.ones(5, 3, dtype=torch.float64)
    loss = gist_fast.gist_loss(a, p, g, g, n, g, margin=0.01, reduction="none", backend=backend)
    torch.testing.assert_close(loss, torch.zeros(5, dtype=torch.float64))


# --- API surface ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_negative_formats_agree(backend):
    rng = rng_for("formats", backend)
    problem = draw_problem(rng, 5, 6, 4, 2, options={"reduction": "none"})
    s, g = problem.args(torch.float64, requires_grad=False)
    backend = {"backend": backend, "temperature": 1.0}
    as_list = gist_fast.gist_loss(s[0], s[1], g[0], g[1], s[2:], g[2:], **backend)
    as_tuple = gist_fast.gist_loss(s[0], s[1], g[0], g[1], tuple(s[2:]), tuple(g[2:]), **backend)
    as_stack = gist_fast.gist_loss(s[0], s[1], g[0], g[1], torch.stack(s[2:]), torch.stack(g[2:]), **backend)
    torch.testing.assert_close(as_list, as_tuple)
    torch.testing.assert_close(as_list, as_stack)
    one = gist_fast.gist_loss(s[0], s[1], g[0], g[1], s[2], g[2], **backend)
    one_listed = gist_fast.gist_loss(s[0], s[1], g[0], g[1], [s[2]], [g[2]], **backend)
    torch.testing.assert_close(one, one_listed)
    assert not torch.allclose(one, as_list)  # the second column changes the loss


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    rng = rng_for("noncontig", backend)
    problem = draw_problem(rng, 6, 8, 5, 1)
    s, g = problem.args(torch.float32, requires_grad=False)
    wide = [torch.cat([t, torch.randn_like(t)], 1)[:, ::2] for t in s]  # strided views
    for t, w in zip(s, wide, strict=True):
        w.copy_(t)
    transposed = [t.T.contiguous().T for t in g]  # column-major
    assert not wide[0].is_contiguous() and not transposed[0].is_contiguous()
    expected = gist_fast.gist_loss(s[0], s[1], g[0], g[1], s[2], g[2], backend=backend)
    got = gist_fast.gist_loss(wide[0], wide[1], transposed[0], transposed[1], wide[2], transposed[2], backend=backend)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inputs_not_modified_and_guides_get_no_gradient(backend):
    rng = rng_for("inplace", backend)
    problem = draw_problem(rng, 7, 6, 4, 2)
    s, g = problem.args(torch.float32)
    for t in g:
        t.requires_grad_()
    before = [t.detach().clone() for t in s + g]
    loss = gist_fast.gist_loss(s[0], s[1], g[0], g[1], s[2:], g[2:], backend=backend)
    loss.backward()
    for t, b in zip(s + g, before, strict=True):
        assert torch.equal(t.detach(), b)
    assert all(t.grad is not None for t in s)
    assert all(t.grad is None or not t.grad.any() for t in g)


def test_only_some_inputs_require_grad():
    rng = rng_for("partial-grad")
    problem = draw_problem(rng, 5, 6, 4, 1)
    s, g = problem.args(torch.float64, requires_grad=False)
    s[1].requires_grad_()
    loss = gist_fast.gist_loss(s[0], s[1], g[0], g[1], s[2], g[2], backend="torch")
    (grad,) = torch.autograd.grad(loss, [s[1]])
    s_ref, _ = problem.args(torch.float64)
    ref = gist_fast.gist_loss(s_ref[0], s_ref[1], g[0], g[1], s_ref[2], g[2], backend="reference")
    torch.testing.assert_close(grad, torch.autograd.grad(ref, [s_ref[1]])[0])


def test_no_grad_forward_equals_grad_forward():
    rng = rng_for("nograd")
    problem = draw_problem(rng, 9, 6, 4, 1)
    s, g = problem.args(torch.float32)
    with torch.no_grad():
        a = gist_fast.gist_loss(s[0], s[1], g[0], g[1], s[2], g[2], backend="torch")
    b = gist_fast.gist_loss(s[0], s[1], g[0], g[1], s[2], g[2], backend="torch")
    assert torch.equal(a, b.detach())


def test_double_backward_is_refused():
    rng = rng_for("double")
    problem = draw_problem(rng, 4, 5, 3, 0)
    s, g = problem.args(torch.float64)
    loss = gist_fast.gist_loss(s[0], s[1], g[0], g[1], backend="torch")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, [s[0]], create_graph=True)
    (grad,) = torch.autograd.grad(loss, [s[0]])  # a plain backward still works afterwards
    assert torch.isfinite(grad).all()


def test_gist_loss_module_matches_function():
    rng = rng_for("module")
    problem = draw_problem(rng, 6, 5, 4, 1)
    s, g = problem.args(torch.float64, requires_grad=False)
    opts = dict(temperature=0.07, margin_strategy="relative", margin=0.05, contrast_anchors=False, reduction="sum")
    module = gist_fast.GISTLoss(**opts)
    assert "relative" in repr(module)
    torch.testing.assert_close(
        module(s[0], s[1], g[0], g[1], s[2], g[2]), gist_fast.gist_loss(*s[:2], *g[:2], s[2], g[2], **opts)
    )


def test_auto_backend_is_torch_on_cpu():
    from gist_fast.backends import auto_backend

    inputs, _ = validate(
        *torch.randn(4, 2, 3).unbind(0), None, None, temperature=0.1, margin_strategy="absolute", margin=0.0,
        contrast_anchors=True, contrast_positives=True, reduction="mean",
    )  # fmt: skip
    assert auto_backend(inputs) == "torch"


def test_auto_takes_the_measured_faster_triton_plan_for_the_shape():
    """On an H200 the fused plan won at B = 4096 and the chunked plan at B = 16384 (k = 1)."""
    from gist_fast.backends import FUSED_PLAN_MAX_LOGITS, triton_plan

    assert triton_plan(4096, 4096, 1) == "triton"
    assert triton_plan(16384, 16384, 1) == "triton_chunked"
    assert triton_plan(65536, 65536, 0) == "triton_chunked"
    # the switch counts every column: more negative columns move it to smaller batches
    b = 4000
    assert b * b * 4 < FUSED_PLAN_MAX_LOGITS < b * b * 12
    assert triton_plan(b, b, 1) == "triton"
    assert triton_plan(b, b, 9) == "triton_chunked"


def test_options_dataclass_threshold():
    t = torch.tensor([0.5, -0.5])
    torch.testing.assert_close(GISTOptions(margin=0.1).threshold(t), torch.tensor([0.4, -0.6]))
    torch.testing.assert_close(
        GISTOptions(margin_strategy="relative", margin=0.1).threshold(t), torch.tensor([0.45, -0.55])
    )
