"""The Triton backend against the float64 oracle: options, block edges, dtypes, offset, strides.

Both plans run the matrix (`plan` parameter): the fused kernels (`Blocks`, the default) and the
chunked GEMM-shaped kernels (`Chunks`, NOTES.md v3) with chunks small enough that every problem
crosses row-chunk, column-chunk and tile edges.

On a machine without CUDA, conftest.py sets TRITON_INTERPRET=1 so the real kernels run on the CPU
through Triton's interpreter; shapes are small and the blocks are 16 wide there (INTERPRETER_BLOCKS),
so a few rows and columns already cross tile edges. Tolerances as in test_loss.py
(problems.TOLERANCES): float32 loss 2e-5 / gradients 1e-4, float16 2e-5 / 2e-3,
bfloat16 2e-5 / 1.6e-2, relative to the largest magnitude of the compared tensor.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from problems import (  # noqa: E402
    NEGATIVE_COUNTS,
    REDUCTIONS,
    TOLERANCES,
    Problem,
    assert_close_scaled,
    assert_matches_oracle,
    draw_gathered,
    draw_problem,
    draw_random_problem,
    loss_and_grads,
    option_cross_product,
    rng_for,
)

import gist_fast  # noqa: E402
from gist_fast.backends.reference import gist_loss_reference  # noqa: E402
from gist_fast.backends.triton import Blocks, Chunks, gist_loss_triton  # noqa: E402
from gist_fast.backends.triton.common import interpreting  # noqa: E402
from gist_fast.inputs import validate  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
# bf16 runs everywhere (the interpreter takes its dots in fp32: its bf16 dot is wrong).
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEFAULT_OPTIONS = {
    "temperature": 0.01,
    "margin_strategy": "absolute",
    "margin": 0.0,
    "contrast_anchors": True,
    "contrast_positives": True,
    "reduction": "mean",
}


# Under the interpreter 16-wide tiles in chunks of 16 rows x 24 columns (two tiles, one partial), so
# B >= 17 crosses row chunks and B or P >= 25 column chunks; on a GPU (dot dims >= 16) 64 x 96.
SMALL_CHUNKS = (
    Chunks(rows=16, columns=24, tile_m=16, tile_n=16, tile_k=16, gemm_m=16, gemm_n=16, gemm_k=16)
    if not ON_GPU
    else Chunks(rows=64, columns=96, tile_m=32, tile_n=32, tile_k=32, gemm_m=32, gemm_n=32, gemm_k=32, stages=2)
)
PLANS = {"fused": None, "chunked": SMALL_CHUNKS}
plan_param = pytest.mark.parametrize("plan", list(PLANS))


def on_device(problem: Problem) -> Problem:
    return Problem([t.to(DEVICE) for t in problem.student], [t.to(DEVICE) for t in problem.guide], problem.options)


def triton_loss(blocks: Blocks | Chunks | None = None):
    """`gist_loss(..., backend="triton")`, or the backend function with explicit blocks."""
    if blocks is None:
        return lambda *a, **kw: gist_fast.gist_loss(*a, **kw, backend="triton")

    def loss_fn(a, p, ga, gp, n, gn, **options):
        inputs, opts = validate(a, p, ga, gp, n, gn, **(DEFAULT_OPTIONS | options))
        return gist_loss_triton(inputs, opts, blocks=blocks)

    return loss_fn


def check(problem: Problem, dtype: torch.dtype = torch.float32, blocks: Blocks | Chunks | None = None) -> None:
    """Loss and gradients match the oracle (float64, on the same device as the inputs)."""
    problem = on_device(problem)
    assert_matches_oracle(triton_loss(blocks), problem, dtype)


def test_helpers_keep_the_inputs_device():
    """The oracle helpers take every tensor's device from the inputs, so the suite runs on a GPU.

    The first GPU run (benchmarks/results/gpu_nvidia-h200_2026-11-29/) failed every reduction='none'
    problem at `loss * weight`: the upstream weight was drawn on the CPU, the loss was on cuda:0.
    The meta device stands in for a GPU here: a CPU tensor meeting it fails the same way."""
    import os

    from problems import SESSION_SEED, upstream_weight

    def per_row_dot(a, p, ga, gp, n, gn, reduction="mean", **options):
        rows = (a * p).sum(dim=1) + sum((a * t).sum(dim=1) for t in n or [])
        return rows if reduction == "none" else rows.sum()

    rng = rng_for("helpers-device")
    for reduction in ("none", "mean", "sum"):
        problem = draw_problem(rng, 4, 3, 2, 1, options={"reduction": reduction})
        on_meta = Problem([t.to("meta") for t in problem.student], [t.to("meta") for t in problem.guide],
                          problem.options)  # fmt: skip
        loss, grads = loss_and_grads(per_row_dot, on_meta, torch.float32)
        assert loss.device.type == "meta" and all(g.device.type == "meta" for g in grads), reduction
        weight = upstream_weight(problem, torch.float32, "meta")
        assert weight.device.type == "meta" and weight.dtype == torch.float32
        # The same values on every device: drawn on the CPU, then moved.
        assert torch.equal(upstream_weight(problem, torch.float32), upstream_weight(problem).float())
    # pytest-xdist's workers (the GPU suite runs with -n) inherit the seed the header prints.
    assert os.environ["GIST_TEST_SEED"] == str(SESSION_SEED)


@plan_param
@pytest.mark.parametrize("options", option_cross_product(), ids=lambda o: "-".join(str(v) for v in o.values()))
def test_option_cross_product(options, plan):
    rng = rng_for("triton-options", options, plan)
    problem = draw_problem(
        rng, rng.choice([2, 3, 5]), rng.choice([1, 7, 20]), rng.choice([5, 18]), rng.choice(NEGATIVE_COUNTS),
        options=options,
    )  # fmt: skip
    check(problem, blocks=PLANS[plan])


# (B, d, dg, k): B smaller than a block, equal to it, just over it, several blocks; d and dg
# below, at and above BLOCK_K = 16 and not multiples of it.
EDGE_SHAPES = [
    (1, 1, 1, 0),
    (1, 16, 3, 3),
    (15, 17, 16, 1),
    (16, 16, 33, 0),
    (17, 33, 7, 2),
    (33, 7, 1, 1),
    (40, 48, 20, 1),
]


@plan_param
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=lambda s: "B{}-d{}-dg{}-k{}".format(*s))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_block_edges(shape, reduction, plan):
    batch, dim, guide_dim, k = shape
    rng = rng_for("triton-edges", shape, reduction, plan)
    options = draw_random_problem(rng).options | {"reduction": reduction}
    check(draw_problem(rng, batch, dim, guide_dim, k, options=options), blocks=PLANS[plan])


@plan_param
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trial", range(4))
def test_dtypes(dtype, trial, plan):
    rng = rng_for("triton-dtype", dtype, trial, plan)
    check(draw_random_problem(rng, max_batch=17, dims=[1, 7, 24, 40]), dtype, blocks=PLANS[plan])


@pytest.mark.skipif(not ON_GPU, reason="realistic feature dims take minutes under the interpreter")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [(384, 1024), (768, 1024), (1024, 768), (1536, 384), (4096, 1024), (7, 1)])
@plan_param
def test_feature_dims_gpu(dims, dtype, plan):
    rng = rng_for("triton-dims", dims, dtype, plan)
    batch = rng.choice([200, 1000, 1500])
    check(draw_problem(rng, batch, dims[0], dims[1], 1, options={"temperature": 0.05}), dtype, blocks=PLANS[plan])


@pytest.mark.parametrize(
    "blocks",
    [Blocks(16, 16, 16, programs=1), Blocks(32, 16, 16, programs=2), Blocks(16, 32, 32, programs=5)],
    ids=lambda b: f"own{b.owned}-str{b.streamed}-k{b.k}-p{b.programs}",
)
def test_block_configs(blocks):
    """Persistent programs that own several tiles, rectangular tiles, BLOCK_K > d."""
    rng = rng_for("triton-blocks", blocks)
    problem = draw_problem(rng, 37, 20, 9, 2, options={"reduction": "mean", "temperature": 0.05})
    check(problem, blocks=blocks)
    check(Problem(problem.student, problem.guide, {"reduction": "none", "temperature": 0.1}), blocks=blocks)


def _gathered(rng, batch: int, world: int, rank: int, k: int, dtype: torch.dtype):
    """Student/guide tensors of a gathered problem at `dtype`: B local anchors, P = world * B candidates."""
    student, guide = draw_gathered(rng, batch, world, rank, 9, 6, k)
    return [t.to(dtype) for t in student], [t.to(dtype) for t in guide]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("world,rank", [(2, 1), (3, 1), (3, 2)])
@plan_param
def test_gather_offset(world, rank, dtype, plan):
    """P = world * B candidates; anchor i's target is column offset + i (offset = rank * B)."""
    rng = rng_for("triton-offset", world, rank, dtype, plan)
    batch, k = rng.choice([3, 17]), rng.choice([0, 1, 2])
    student, guide = _gathered(rng, batch, world, rank, k, dtype)
    options = {
        "temperature": 0.05,
        "margin_strategy": rng.choice(["absolute", "relative"]),
        "margin": rng.choice([0.0, 0.1]),
        "contrast_anchors": rng.random() < 0.5,
        "contrast_positives": rng.random() < 0.5,
        "reduction": rng.choice(["none", "sum", "mean"]),
        "offset": rank * batch,
        "expected_candidates": batch * world,
    }

    def run(backend_fn, tensors, on):
        s = [t.detach().to(on).requires_grad_() for t in tensors[0]]
        g = [t.to(on) for t in tensors[1]]
        inputs, opts = validate(s[0], s[1], g[0], g[1], s[2:] or None, g[2:] or None, **options)
        loss = backend_fn(inputs, opts)
        weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
        return loss, torch.autograd.grad((loss * weight).sum(), s)

    wide = ([t.double() for t in student], [t.double() for t in guide])
    expected_loss, expected_grads = run(gist_loss_reference, wide, "cpu")
    loss, grads = run(lambda i, o: gist_loss_triton(i, o, blocks=PLANS[plan]), (student, guide), DEVICE)
    # Error floors as in problems.assert_matches_oracle: logits scale like 1/temperature, and the
    # normalisation's projection cancels terms of size weight/temperature/|x| (x B rows for sums).
    tol, logit_scale = TOLERANCES[dtype], 1.0 / options["temperature"]
    rows = 1 if options["reduction"] == "mean" else batch
    assert_close_scaled(loss.cpu(), expected_loss, tol["loss"], "loss", floor=0.1 * logit_scale)
    for got, want, x in zip(grads, expected_grads, student, strict=True):
        assert got.dtype == dtype
        floor = 1e-2 * logit_scale * 1.5 * rows / x.double().norm(dim=1).min().item()
        assert_close_scaled(got.cpu(), want, tol["grad"], "grad", floor=floor)


def test_kernel_layout_pads_odd_dims_and_keeps_aligned_inputs():
    """Inputs the kernels can read with 16-byte vectors are passed as they are; others (odd d,
    a strided feature axis, an unaligned row stride) are copied to a width padded to 16 with zeros."""
    from gist_fast.backends.triton.common import ROW_ALIGN, _kernel_layout

    aligned = torch.randn(5, 32)
    assert _kernel_layout(aligned) is aligned
    stacked = torch.randn(2, 5, 48)
    assert _kernel_layout(stacked) is stacked
    for t in (torch.randn(5, 7), torch.randn(32, 5).T, torch.randn(5, 40)[:, :32], torch.randn(3, 5, 7)):
        laid = _kernel_layout(t)
        d = t.shape[-1]
        assert laid.shape[-1] % ROW_ALIGN == 0 and laid.stride(-1) == 1
        assert all(s % ROW_ALIGN == 0 for s in laid.stride()[:-1])
        assert torch.equal(laid[..., :d], t) and not laid[..., d:].any()


@plan_param
def test_rows_beyond_int32_offsets(plan):
    """Rows that start more than 2^31 elements into their storage are read where they are.

    At B = 2^20 with a 2048-wide guide, the stacked guide columns hold 2^32 elements: a row's offset
    row * row_stride overflows int32, so the kernels form it in int64. Here the offsets come from a
    huge row stride instead of a huge batch (row 4 starts at 2^31 + 64 elements; the storage between
    rows is virtual memory, never touched), and the result must equal the same values stored
    contiguously. An int32 product wraps to a negative offset: the view starts 2^31 elements into
    its storage, so the wrapped read lands inside it (a wrong value, not a crash)."""
    rng = rng_for("triton-int64", plan)
    # d and dg multiples of 16, so the kernels read these views as they are (no aligned copy).
    problem = on_device(draw_problem(rng, 5, 16, 32, 1, options={"reduction": "sum", "temperature": 0.05}))
    row_stride = 2**29 + 16

    def far_apart(t: torch.Tensor) -> torch.Tensor:
        lead = 2**31
        storage = torch.empty(lead + row_stride * (t.shape[0] - 1) + t.shape[1], dtype=torch.float16, device=DEVICE)
        view = storage.as_strided(t.shape, (row_stride, 1), lead)
        view.copy_(t)
        return view

    def run(student, guide):
        student = [t.detach().requires_grad_() for t in student]
        loss = triton_loss(PLANS[plan])(student[0], student[1], guide[0], guide[1], student[2:], guide[2:],
                                        **problem.options)  # fmt: skip
        return loss, torch.autograd.grad(loss, student)

    student = [t.half() for t in problem.student]
    guide = [t.half() for t in problem.guide]
    expected_loss, expected_grads = run(student, guide)
    far_student = [far_apart(t) for t in student[:2]] + student[2:]
    far_guide = [far_apart(t) for t in guide[:2]] + guide[2:]
    assert far_student[0].stride(0) * 4 >= 2**31
    from gist_fast.backends.triton.common import _kernel_layout

    assert all(_kernel_layout(t) is t for t in far_student[:2] + far_guide[:2])  # read in place
    loss, grads = run(far_student, far_guide)
    assert_close_scaled(loss, expected_loss, 1e-6, "loss (rows beyond int32 offsets)")
    for got, want in zip(grads, expected_grads, strict=True):
        assert_close_scaled(got.float(), want.float(), 1e-3, "grad (rows beyond int32 offsets)")


def test_non_contiguous_and_stacked_negatives():
    """Transposed and strided inputs, negatives as one (k, P, d) tensor and as separate tensors."""
    rng = rng_for("triton-strides")
    problem = draw_problem(rng, 19, 12, 10, 2, options={"reduction": "sum", "temperature": 0.05})
    expected_loss, expected_grads = loss_and_grads(triton_loss(), on_device(problem), torch.float32)

    def strided(t: torch.Tensor) -> torch.Tensor:
        # Same values, column-major storage with a gap between columns.
        wide = torch.zeros(t.shape[1], 2 * t.shape[0], dtype=torch.float32, device=DEVICE)
        wide[:, ::2] = t.T.float()
        return wide[:, ::2].T

    student = [strided(t).requires_grad_() for t in problem.student]
    guide = [strided(t) for t in problem.guide]
    assert not student[0].is_contiguous()
    loss = gist_fast.gist_loss(
        student[0], student[1], guide[0], guide[1], student[2:], guide[2:], backend="triton", **problem.options
    )
    grads = torch.autograd.grad(loss * problem_weight(problem), student)
    assert_close_scaled(loss, expected_loss, 1e-6, "loss (strided)")
    for got, want in zip(grads, expected_grads, strict=True):
        assert_close_scaled(got, want, 1e-5, "grad (strided)")

    # Negatives as one (k, P, d) tensor: the backend reads them through a view.
    negs = torch.stack([t.detach().float() for t in problem.student[2:]]).to(DEVICE).requires_grad_()
    s = [t.detach().float().to(DEVICE).requires_grad_() for t in problem.student[:2]]
    g = [t.float().to(DEVICE) for t in problem.guide]
    loss = gist_fast.gist_loss(s[0], s[1], g[0], g[1], negs, torch.stack(g[2:]), backend="triton", **problem.options)
    grads = torch.autograd.grad(loss * problem_weight(problem), [*s, negs])
    assert_close_scaled(loss, expected_loss, 1e-6, "loss (stacked)")
    for got, want in zip([*grads[:2], *grads[2].unbind(0)], expected_grads, strict=True):
        assert_close_scaled(got, want, 1e-5, "grad (stacked)")


def problem_weight(problem: Problem) -> torch.Tensor:
    from problems import upstream_weight

    return upstream_weight(problem, torch.float32).to(DEVICE)


@plan_param
def test_exact_ties_are_kept(plan):
    """A guide of dimension 1 makes every guide cosine exactly +-1: with margin 0 every candidate
    on the positive's side ties with the threshold and must be kept (strict rule), as in float64."""
    rng = rng_for("triton-ties", plan)
    for margin in (0.0, 0.1, -0.1):
        problem = draw_problem(rng, 21, 8, 1, 1, options={"margin": margin, "temperature": 0.1})
        check(problem, blocks=PLANS[plan])


@plan_param
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin", [0.0, 2.0])
def test_every_logit_far_below_zero(plan, reduction, margin):
    """d = 1 with every anchor opposite every candidate: all logits are -1/tau = -100, so exp() of
    them underflows in fp32 and the online max starts far below 0. With margin 2 the guide masks
    every entry but the target, so rows whose target lies past the first tile or chunk see only
    masked entries first. A rescale factor formed against a reference of 0 for a still-empty
    accumulator (exp(0 - (-100)) = inf, times 0) made NaNs here: in the fused row pass since
    session 1, and in a first version of the chunked plan."""
    rng = rng_for("triton-far-below", plan, reduction, margin)
    options = {
        "temperature": 0.01, "margin": margin, "reduction": reduction,
        "contrast_anchors": False, "contrast_positives": False,
    }  # fmt: skip
    problem = draw_problem(rng, 20, 1, 3, 1, options=options)
    anchor, *candidates = problem.student
    problem.student = [-anchor.abs() - 0.1] + [t.abs() + 0.1 for t in candidates]
    check(problem, blocks=PLANS[plan])


def test_loss_backward_and_determinism():
    """loss.backward() (grad_out = 1, no copy) gives the oracle's gradients, bit-identical twice."""
    rng = rng_for("triton-determinism")
    problem = on_device(draw_problem(rng, 23, 10, 6, 1, options={"temperature": 0.05}))
    runs = []
    for _ in range(2):
        student, guide = problem.args(torch.float32)
        loss = gist_fast.gist_loss(*student[:2], *guide[:2], student[2:], guide[2:], temperature=0.05, backend="triton")
        loss.backward()
        runs.append([t.grad.clone() for t in student])
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)
    from problems import oracle

    unit = Problem(problem.student, problem.guide, {"temperature": 0.05})
    _, expected = oracle(
        Problem([t.cpu() for t in unit.student], [t.cpu() for t in unit.guide], unit.options), torch.float32
    )
    scale = float(problem_weight(unit))  # the oracle used this upstream weight
    for got, want in zip(runs[0], expected, strict=True):
        assert_close_scaled(got.cpu() * scale, want, 1e-4, "grad via loss.backward()")


@pytest.mark.skipif(not ON_GPU, reason="peak GPU memory needs CUDA")
@pytest.mark.parametrize("backend", ["triton", "triton_chunked"])
def test_peak_memory_is_linear_in_the_batch(backend):
    """Issue 3's memory target at B = 65536, d = 768, dg = 1024, one negative, bf16: the peak above
    the inputs is at most 1.25 x (inputs + their gradients) + 64 MB - inputs, i.e. no B x N buffer."""
    batch, dim, guide_dim = 65536, 768, 1024
    gen = torch.Generator(device="cuda").manual_seed(0)
    student = [torch.randn(batch, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3)]
    guide = [torch.randn(batch, guide_dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3)]
    for t in student:
        t.requires_grad_()
    torch.cuda.synchronize()
    inputs = sum(t.numel() * t.element_size() for t in student + guide)
    gradients = sum(t.numel() * t.element_size() for t in student)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = gist_fast.gist_loss(student[0], student[1], guide[0], guide[1], student[2:], guide[2:], backend=backend)
    loss.backward()
    torch.cuda.synchronize()
    peak_above_inputs = torch.cuda.max_memory_allocated() - base
    allowed = 1.25 * (inputs + gradients) + 64 * 2**20 - inputs
    assert torch.isfinite(loss)
    assert peak_above_inputs <= allowed, f"peak {peak_above_inputs / 2**20:.0f} MiB > {allowed / 2**20:.0f} MiB"


def test_chunk_shape_is_capped_by_the_inputs():
    """The chunked plan's R x C matrix is capped by B and P (and C at 1024 tiles), and halved
    (the larger side first) until it is at most 1/8 of the inputs' bytes (but never below 4 Mi
    entries or one tile)."""
    from types import SimpleNamespace

    from gist_fast.backends.triton.chunked import _chunk_shape

    def problem(batch, dim, guide_dim, k=1):
        student = torch.empty(batch, dim, dtype=torch.bfloat16)
        guide = torch.empty(batch, guide_dim, dtype=torch.bfloat16)
        n, gn = torch.empty(k, batch, dim, dtype=torch.bfloat16), torch.empty(k, batch, guide_dim, dtype=torch.bfloat16)
        return SimpleNamespace(B=batch, P=batch, a=student, p=student, n=n, ga=guide, gp=guide, gn=gn)

    chunks = Chunks()
    assert _chunk_shape(problem(100, 8, 8), chunks) == (100, 100)  # capped by B
    # B = 65536, d = 768, dg = 1024, k = 1: 705 MB of inputs -> at most 44 Mi bf16 entries.
    rows, cols = _chunk_shape(problem(65536, 768, 1024), chunks)
    assert (rows, cols) == (4096, 8192)  # rows halved first on a tie
    # B = 2^20: the full 8192 x 8192 chunk is far below 1/8 of the inputs.
    big = SimpleNamespace(**vars(problem(1, 768, 1024)))
    big.B = big.P = 2**20
    big.a = big.p = torch.empty(2**20, 768, dtype=torch.bfloat16, device="meta")
    assert _chunk_shape(big, chunks) == (8192, 8192)
    # Wide chunks stop at 1024 tiles a row (the stats kernel holds a row's tiles at once).
    wide = SimpleNamespace(**(vars(big) | {"P": 2**23}))
    assert _chunk_shape(wide, Chunks(rows=16, columns=2**23)) == (16, 1024 * 64)
    # Small inputs: never below 4 Mi entries.
    rows, cols = _chunk_shape(problem(4096, 64, 64), chunks)
    assert rows * cols == 4 << 20 and (rows, cols) == (2048, 2048)


def test_double_backward_is_refused():
    rng = rng_for("triton-double")
    problem = on_device(draw_problem(rng, 4, 5, 3, 0))
    student, guide = problem.args(torch.float32)
    loss = gist_fast.gist_loss(*student[:2], *guide[:2], backend="triton")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, student[0], create_graph=True)
    (grad,) = torch.autograd.grad(loss, student[0])  # a plain backward still works afterwards
    assert torch.isfinite(grad).all()


def test_no_grad_inputs_and_float64():
    rng = rng_for("triton-nograd")
    problem = on_device(draw_problem(rng, 9, 6, 4, 1, options={"reduction": "none"}))
    student, guide = problem.args(torch.float32, requires_grad=False)
    loss = gist_fast.gist_loss(*student[:2], *guide[:2], student[2:], guide[2:], backend="triton", reduction="none")
    want = gist_fast.gist_loss(*student[:2], *guide[:2], student[2:], guide[2:], backend="reference", reduction="none")
    assert_close_scaled(loss, want, 2e-5, "loss without grad")
    # float64 is computed exactly (by the tiled PyTorch path).
    check(problem, torch.float64)


@pytest.mark.skipif(ON_GPU or not interpreting(), reason="checks the CPU interpreter setup")
def test_runs_under_the_interpreter():
    assert interpreting()


def test_second_backward_through_one_loss_is_refused():
    """mean/sum hand their precomputed gradients to the first backward (no copy); a second one
    through the same graph must fail loudly rather than return stale gradients."""
    rng = rng_for("triton-retain")
    problem = on_device(draw_problem(rng, 5, 6, 4, 1))
    student, guide = problem.args(torch.float32)
    loss = gist_fast.gist_loss(*student[:2], *guide[:2], student[2:], guide[2:], backend="triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def _ptxas_available() -> bool:
    import os

    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def _build_report(*args: str) -> dict[str, dict[str, int]]:
    """Run the offline sm_90 build check in a fresh process without TRITON_INTERPRET; return
    kernel -> {REG, STACK, SHARED, WGMMA, CP_ASYNC, F64}."""
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run(
        [sys.executable, "-m", "gist_fast.backends.triton.compile_check", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = {}
    for line in run.stdout.splitlines():
        name, _, fields = line.partition(": ")
        report[name] = {key: int(value) for key, value in re.findall(r"([A-Z_][A-Z0-9_]*):(-?\d+)", fields)}
    assert len(report) == 13, run.stdout
    return report


@pytest.mark.skipif(not _ptxas_available(), reason="triton has no bundled ptxas here")
@pytest.mark.parametrize(
    ("dtype", "dims"),
    [("bf16", "768 1024"), ("fp16", "768 1024"), ("fp32", "768 1024"), ("bf16", "769 1023")],
    ids=["bf16", "fp16", "fp32", "bf16-odd-dims"],
)
def test_kernels_build_for_sm90(dtype, dims):
    """Every kernel variant compiles for an H100 (sm_90) without a GPU, with the specialisation a
    real launch of a d = 768 / dg = 1024 problem gets: what the interpreter cannot see (dot shapes
    and layouts, types) fails here. The dot loops must be software-pipelined (cp.async copies;
    missing when the kernels took the feature stride as an argument, NOTES.md v2a); in 16-bit, the
    speed dtypes, they must run on the Hopper tensor cores (wgmma) and the default tiles must not
    spill (fp32, kept for correctness, spills a little at these tiles). No kernel computes in float64
    (triton 3.6 typed a 1e-38 literal as float64: 228 f64 instructions in chunk_tile[pass1]).
    Odd dims (769, 1023) are laid out padded to 16 (NOTES v3d), so they pipeline too."""
    report = _build_report("--dtype", dtype, "--dims", *dims.split())
    for name, build in report.items():
        assert build["F64"] == 0, f"{name} computes in float64: {build}"
    gemm_kernels = [name for name in report if name != "row_dots" and not name.startswith("chunk_stats")]
    for name in gemm_kernels:
        build = report[name]
        assert build["CP_ASYNC"] > 0, f"{name} loads are not pipelined: {build}"
        if dtype != "fp32":
            assert build["WGMMA"] > 0, f"{name} does not use wgmma: {build}"
            assert build["STACK"] == 0, f"{name} spills: {build}"
    # The Matryoshka tile kernel's student sweep (segments at any dim) pipelines like the plain
    # tile kernel's dot loop: as many cp.async (26 of 52 when its loads started at the segment
    # edge: only the guide's loop was pipelined) and wgmma.
    for mode in ("pass1", "pass2"):
        plain, matryoshka = report[f"chunk_tile[{mode}]"], report[f"chunk_tile_matryoshka[{mode}]"]
        assert matryoshka["CP_ASYNC"] >= plain["CP_ASYNC"], f"Matryoshka sweep not pipelined: {matryoshka}"
        assert matryoshka["WGMMA"] >= plain["WGMMA"], f"Matryoshka sweep off the tensor cores: {matryoshka}"


def test_mixed_student_and_guide_dtypes():
    """A float32 student with a float16 guide (a guide cached in half precision) and the reverse."""
    rng = rng_for("triton-mixed")
    problem = on_device(draw_problem(rng, 18, 12, 20, 1, options={"temperature": 0.05, "reduction": "sum"}))
    for student_dtype, guide_dtype in ((torch.float32, torch.float16), (torch.float16, torch.float32)):
        student = [t.to(student_dtype) for t in problem.student]
        guide = [t.to(guide_dtype) for t in problem.guide]
        # The oracle sees exactly the rounded values, in float64.
        rounded = Problem([t.double() for t in student], [t.double() for t in guide], problem.options)
        expected_loss, expected_grads = loss_and_grads(
            lambda *a, **kw: gist_fast.gist_loss(*a, **kw, backend="reference"), rounded, torch.float64
        )
        s = [t.detach().requires_grad_() for t in student]
        loss = gist_fast.gist_loss(
            s[0], s[1], guide[0], guide[1], s[2:], guide[2:], backend="triton", **problem.options
        )
        grads = torch.autograd.grad(loss * problem_weight(problem), s)
        tol = TOLERANCES[student_dtype]
        assert_close_scaled(loss, expected_loss, tol["loss"], "loss (mixed)", floor=0.1 / 0.05)
        for got, want in zip(grads, expected_grads, strict=True):
            assert got.dtype == student_dtype
            assert_close_scaled(got, want, tol["grad"], "grad (mixed)", floor=1e-2 / 0.05 * 18)


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA tensors")
def test_auto_backend_is_triton_on_cuda():
    from gist_fast.backends import auto_backend

    rng = rng_for("triton-auto")
    problem = on_device(draw_problem(rng, 8, 16, 16, 1))
    inputs, _ = validate(*problem.student[:2], *problem.guide[:2], problem.student[2:], problem.guide[2:],
                         **DEFAULT_OPTIONS)  # fmt: skip
    assert auto_backend(inputs) == "triton"


@pytest.mark.skipif(ON_GPU, reason="checks the CPU message")
def test_cpu_tensors_without_interpreter_get_a_clear_error():
    import os
    import subprocess
    import sys

    code = (
        "import torch, gist_fast\n"
        "a, p = torch.randn(2, 4, 8).unbind(0)\n"
        "try:\n"
        "    gist_fast.gist_loss(a, p, a, p, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "ERR" in run.stdout and "backend='torch'" in run.stdout, run.stdout + run.stderr
