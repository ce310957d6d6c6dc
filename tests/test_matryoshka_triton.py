"""The chunked Triton plan's one-pass Matryoshka loss against the float64 composition of single-dim losses.

The oracle (test_matryoshka.composed) is ``sum_m w_m * reference(student[..., :m]; guide)`` in
float64 on the inputs rounded to the tested dtype. Under the interpreter (conftest.py) the kernels
run on the CPU with 16-wide tiles in chunks of 16 rows x 24 columns, so the batches here cross row
and column chunks and the dims (d itself, 1, 33, 65 and random others) split the 16-wide feature
blocks unevenly. Tolerances: problems.TOLERANCES (float32 loss 2e-5, gradients 1e-4; fp16 2e-3 and
bf16 1.6e-2 for gradients), relative to the compared tensor's largest magnitude, floors scaled by the
sum of |w_m| (test_matryoshka.assert_matches_composition).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from problems import OPTION_GRID, TEMPERATURES, Problem, draw_problem, rng_for  # noqa: E402
from test_matryoshka import assert_matches_composition, draw_weights  # noqa: E402

import gist_fast  # noqa: E402
from gist_fast import backends  # noqa: E402
from gist_fast.backends.common import has_one_pass_matryoshka  # noqa: E402
from gist_fast.backends.triton import Chunks, chunked_kernels, gist_loss_triton, gist_loss_triton_chunked  # noqa: E402
from gist_fast.inputs import validate  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
SMALL_CHUNKS = (
    Chunks(rows=16, columns=24, tile_m=16, tile_n=16, tile_k=16, gemm_m=16, gemm_n=16, gemm_k=16)
    if not ON_GPU
    else Chunks(rows=64, columns=96, tile_m=32, tile_n=32, tile_k=32, gemm_m=32, gemm_n=32, gemm_k=32, stages=2)
)


def one_pass_loss(a, p, ga, gp, n, gn, **options):
    """The chunked plan called directly (the Matryoshka options reach it; no dispatcher composing)."""
    inputs, opts = validate(a, p, ga, gp, n, gn, **options)
    return gist_loss_triton(inputs, opts, blocks=SMALL_CHUNKS)


def on_device(problem: Problem) -> Problem:
    return Problem([t.to(DEVICE) for t in problem.student], [t.to(DEVICE) for t in problem.guide], problem.options)


def draw_dims(rng, dim: int) -> tuple[int, ...]:
    """d, 1, 33 and 65 (no multiple of 16) and maybe one random other, in random order."""
    dims = {dim, 1, 33, 65}
    dims.update(rng.sample(range(2, dim), rng.randint(0, 1)))
    order = list(dims)
    rng.shuffle(order)
    return tuple(order)


# (dtype, reduction, B, negatives): B = 17 crosses a row chunk, 26 a column chunk too (AA, PP, AN).
CASES = [
    (torch.float32, "mean", 26, 1),
    (torch.float32, "none", 9, 2),
    (torch.bfloat16, "sum", 17, 0),
    (torch.float16, "none", 17, 1),
]


@pytest.mark.parametrize(("dtype", "reduction", "batch", "k"), CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_one_pass_matches_composition(dtype, reduction, batch, k):
    rng = rng_for("matryoshka-triton", dtype, reduction)
    options = {key: rng.choice(values) for key, values in OPTION_GRID.items()}
    options |= {"reduction": reduction, "temperature": rng.choice(TEMPERATURES)}
    dim = rng.choice([70, 80])
    problem = on_device(draw_problem(rng, batch, dim, rng.choice([5, 24]), k, options=options))
    dims = draw_dims(rng, dim)
    assert_matches_composition(one_pass_loss, problem, dims, draw_weights(rng, dims), dtype)


class _Counted:
    """A kernel whose launches (`kernel[grid](...)`) are counted."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


def test_backend_takes_the_one_pass_path(monkeypatch):
    """backend="triton_chunked" computes five dims with as many tile launches (each forming the
    guide mask once) as the plain loss, and no per-dim plain tile launch; the fused plan still composes."""
    assert has_one_pass_matryoshka(gist_loss_triton_chunked)
    assert not has_one_pass_matryoshka(gist_loss_triton)
    plain_tiles, matryoshka_tiles = [], []
    monkeypatch.setattr(chunked_kernels, "tile_kernel", _Counted(chunked_kernels.tile_kernel, plain_tiles))
    monkeypatch.setattr(
        chunked_kernels,
        "matryoshka_tile_kernel",
        _Counted(chunked_kernels.matryoshka_tile_kernel, matryoshka_tiles),
    )
    rng = rng_for("matryoshka-triton-path")
    options = {key: rng.choice(values) for key, values in OPTION_GRID.items()} | {"reduction": "mean"}
    problem = on_device(draw_problem(rng, 5, 40, 8, 1, options=options))
    student, guide = problem.args(torch.float32)  # (float64 would go to the torch backend)

    def tile_launches(**extra) -> tuple[int, int]:
        plain_tiles.clear()
        matryoshka_tiles.clear()
        inputs, opts = validate(student[0], student[1], guide[0], guide[1], student[2:], guide[2:],
                                **problem.options, **extra)  # fmt: skip
        backends.run("triton_chunked", inputs, opts).backward()
        return len(plain_tiles), len(matryoshka_tiles)

    plain, none = tile_launches()
    assert plain > 0 and none == 0
    assert tile_launches(matryoshka_dims=(40, 33, 17, 5, 1)) == (0, plain)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_zero_smallest_prefix_keeps_the_wider_features(dtype):
    """Columns whose first feature is 0 (dim 1's prefix norm 0, clamped to eps): their gradient
    through dim 1 is ~1/eps, and pass 2 sums the dims' H per feature segment in 16 bits. Each
    segment's H is scaled by its own smallest covering norm, so the wider dims' share survives in
    the features past the first (scaled by dim 1's norm instead, it underflowed in fp16). Checked on
    features 1: of every input, relative to their own largest magnitude."""
    from problems import TOLERANCES, loss_and_grads
    from test_matryoshka import composed

    rng = rng_for("matryoshka-triton-zero-prefix", dtype)
    options = {"reduction": "sum", "temperature": 0.05, "margin_strategy": "absolute", "margin": 0.0}
    options |= {"contrast_anchors": True, "contrast_positives": True}
    problem = draw_problem(rng, 9, 40, 12, 1, options=options)
    for t in problem.student:
        t[::2, 0] = 0.0  # every other row: dim 1's prefix is zero
    problem = on_device(problem)
    dims, weights = (1, 17, 40), (1.0, 1.0, 1.0)
    _, expected = composed(problem, dims, weights, dtype)
    _, grads = loss_and_grads(one_pass_loss, problem, dtype, matryoshka_dims=dims, matryoshka_weights=weights)
    for name, g, e in zip(["anchor", "positive", "negatives[0]"], grads, expected, strict=True):
        wide, wide_expected = g[:, 1:].double().cpu(), e[:, 1:].double().cpu()
        err = (wide - wide_expected).abs().max().item()
        scale = wide_expected.abs().max().item()
        assert err <= TOLERANCES[dtype]["grad"] * scale, f"{name}[:, 1:] {dtype}: max error {err:.3g} vs {scale:.3g}"


def test_chunk_shape_keeps_every_dim_under_the_cap():
    """The K chunk matrices (input dtype) and pass 2's fp32 scratch (K x R x C) together stay under
    the plain plan's cap, 1/8 of the inputs' bytes (at least 4 Mi entries' worth), so memory stays
    linear in B whatever K is."""
    from types import SimpleNamespace

    from gist_fast.backends.triton.chunked_matryoshka import _chunk_shape

    batch, dim, guide_dim = 65536, 768, 1024
    student = torch.empty(batch, dim, dtype=torch.bfloat16, device="meta")
    guide = torch.empty(batch, guide_dim, dtype=torch.bfloat16, device="meta")
    n, gn = student.unsqueeze(0), guide.unsqueeze(0)
    problem = SimpleNamespace(B=batch, P=batch, a=student, p=student, n=n, ga=guide, gp=guide, gn=gn)
    input_bytes = 3 * batch * (dim + guide_dim) * 2
    for dims in (1, 5, 8):
        rows, cols = _chunk_shape(problem, Chunks(), dims)
        assert dims * rows * cols * (2 + 4) <= input_bytes // 8, (dims, rows, cols)
        assert 2 * rows * cols * dims * 6 > input_bytes // 8  # halved no further than needed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backend_is_exact_with_one_or_two_wide_prefixes_in_16_bits(dtype):
    """A 1-wide prefix (cosines of +-1) in fp16 / bf16: the one-pass path's 16-bit segment sums lost
    0.19-1.9x the largest gradient (bf16, d = 16, dims (16, 1)) where one call per dim stays within
    0.005; backend="triton_chunked" composes below SMALLEST_ONE_PASS_DIM_16BIT. Checked against the
    largest gradient of each input, without the smallest-prefix round-off floor (which is ~1/|x_1|)."""
    from problems import TOLERANCES, loss_and_grads
    from test_matryoshka import composed

    def backend_loss(a, p, ga, gp, n, gn, **opts):
        return gist_fast.gist_loss(a, p, ga, gp, n, gn, backend="triton_chunked", **opts)

    options = {"reduction": "mean", "temperature": 0.01, "margin_strategy": "absolute", "margin": 0.0}
    options |= {"contrast_anchors": True, "contrast_positives": True}
    for seed in range(3):
        problem = on_device(draw_problem(rng_for("matryoshka-triton-narrow", dtype, seed), 24, 16, 32, 1,
                                         options=options))  # fmt: skip
        for dims in ((16, 1), (16, 2, 1)):
            _, expected = composed(problem, dims, None, dtype)
            _, grads = loss_and_grads(backend_loss, problem, dtype, matryoshka_dims=dims)
            for g, e in zip(grads, expected, strict=True):
                err = (g.double().cpu() - e.double().cpu()).abs().max().item()
                scale = e.double().abs().max().item()
                assert err <= TOLERANCES[dtype]["grad"] * scale, f"{dtype} dims {dims}: {err:.3g} vs {scale:.3g}"
