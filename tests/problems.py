"""Random GIST problems and the float64 oracle, shared by the backend tests.

Every test draws fresh inputs: the seed comes from ``GIST_TEST_SEED`` when set, else from the
clock, and is printed in the header of the pytest run (see conftest.py) so that a failure can be
replayed exactly.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

import gist_fast

SESSION_SEED = int(os.environ.get("GIST_TEST_SEED", time.time_ns() % 2**31))
# Processes started from this one (pytest-xdist's workers, tests' subprocesses) draw the same
# inputs: without this each xdist worker took its own clock seed, and the seed in the run's header
# replayed none of them.
os.environ["GIST_TEST_SEED"] = str(SESSION_SEED)

# Per-dtype tolerances against the float64 reference evaluated on the same (rounded) inputs.
# The backends accumulate in float32, so the loss is float32-accurate whatever the input dtype;
# gradients are returned in the input dtype and carry its rounding (bf16: 8 mantissa bits).
# Errors are measured relative to the largest magnitude in the compared tensor, because logits
# scale like 1/temperature.
TOLERANCES = {
    torch.float64: {"loss": 1e-9, "grad": 1e-9},
    torch.float32: {"loss": 2e-5, "grad": 1e-4},
    torch.float16: {"loss": 2e-5, "grad": 2e-3},
    torch.bfloat16: {"loss": 2e-5, "grad": 1.6e-2},
}

OPTION_GRID = {
    "margin_strategy": ["absolute", "relative"],
    "margin": [0.0, 0.05, 0.1, -0.1],
    "contrast_anchors": [True, False],
    "contrast_positives": [True, False],
}
BATCHES = [1, 2, 3, 17, 64, 129]
DIMS = [1, 7, 64, 384]
NEGATIVE_COUNTS = [0, 1, 2, 3]
TEMPERATURES = [0.01, 0.05, 0.1, 1.0]
REDUCTIONS = ["mean", "sum", "none"]


def option_cross_product() -> list[dict]:
    """All combinations of margin strategy, margin and the two contrast flags (64)."""
    keys = list(OPTION_GRID)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*OPTION_GRID.values())]


def rng_for(*key) -> random.Random:
    """A random generator seeded by the session seed and the test's own key."""
    return random.Random(f"{SESSION_SEED}-{key}")


@dataclass
class Problem:
    """Student and guide embeddings plus loss options; `student` = [anchor, positive, *negatives]."""

    student: list[Tensor]
    guide: list[Tensor]
    options: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.student) - 2

    def args(self, dtype: torch.dtype | None = None, requires_grad: bool = True) -> tuple[list[Tensor], list[Tensor]]:
        """Fresh leaf copies of the student (with grad) and guide inputs, cast to `dtype`."""
        student = [t.detach().to(dtype or t.dtype).requires_grad_(requires_grad) for t in self.student]
        guide = [t.detach().to(dtype or t.dtype) for t in self.guide]
        return student, guide

    def describe(self) -> str:
        B, d = self.student[0].shape
        return f"B={B} d={d} dg={self.guide[0].shape[1]} k={self.k} {self.options} seed={SESSION_SEED}"


def draw_problem(
    rng: random.Random,
    batch: int,
    dim: int,
    guide_dim: int,
    k: int,
    *,
    options: dict | None = None,
    correlated: bool = True,
) -> Problem:
    """Random embeddings in float64. With `correlated`, positives and negatives lean towards their
    anchor (and the guide roughly agrees with the student), so the guide's mask drops a realistic
    share of candidates instead of nearly none or nearly all."""
    gen = torch.Generator().manual_seed(rng.getrandbits(63))

    def draw(rows: int, d: int, base: Tensor | None, weight: float) -> Tensor:
        x = torch.randn(rows, d, generator=gen, dtype=torch.float64)
        return x if base is None else x + weight * base

    anchor = draw(batch, dim, None, 0)
    guide_anchor = draw(batch, guide_dim, None, 0)
    lean = 1.0 if correlated else 0.0
    student = [anchor, draw(batch, dim, anchor, lean)]
    guide = [guide_anchor, draw(batch, guide_dim, guide_anchor, lean)]
    for _ in range(k):
        student.append(draw(batch, dim, anchor, 0.5 * lean))
        guide.append(draw(batch, guide_dim, guide_anchor, 0.5 * lean))
    # Scale rows by random factors: the cosine must not depend on the norm.
    scales = [torch.exp(torch.randn(batch, 1, generator=gen, dtype=torch.float64)) for _ in student]
    student = [t * s for t, s in zip(student, scales, strict=True)]
    opts = {"temperature": rng.choice(TEMPERATURES), "reduction": rng.choice(REDUCTIONS)}
    opts.update(options or {})
    return Problem(student, guide, opts)


def draw_gathered(
    rng: random.Random, batch: int, world: int, rank: int, dim: int, guide_dim: int, k: int
) -> tuple[list[Tensor], list[Tensor]]:
    """One rank's view of a gathered problem: its B anchors (rows rank*B ...), all P = W*B
    candidates (student, guide; float64)."""
    base = draw_problem(rng, batch * world, dim, guide_dim, k)
    rows = slice(rank * batch, (rank + 1) * batch)
    return [base.student[0][rows]] + base.student[1:], [base.guide[0][rows]] + base.guide[1:]


def gathered_loss_and_grads(backend_fn, student, guide, dtype, *, batch: int, world: int, rank: int, **options):
    """Loss and student gradients (of loss.sum()) of `backend_fn` on a gathered problem at `dtype`:
    offset = rank*B, P = W*B candidates, temperature 0.05 and the absolute margin unless `options`
    say otherwise."""
    from gist_fast.inputs import validate

    s = [t.to(dtype).requires_grad_() for t in student]
    g = [t.to(dtype) for t in guide]
    options = {"temperature": 0.05, "margin_strategy": "absolute"} | options
    inputs, opts = validate(
        s[0], s[1], g[0], g[1], s[2:] or None, g[2:] or None,
        offset=rank * batch, expected_candidates=batch * world, **options,
    )  # fmt: skip
    loss = backend_fn(inputs, opts)
    return loss, torch.autograd.grad(loss.sum(), s)


def draw_random_problem(rng: random.Random, max_batch: int = 129, dims=DIMS) -> Problem:
    """Shapes, k and every option drawn at random from the grids above."""
    batch = rng.choice([b for b in BATCHES if b <= max_batch])
    dim = rng.choice(dims)
    guide_dim = rng.choice([g for g in dims if g not in (dim, 1)] or [dim + 1])
    options = {key: rng.choice(values) for key, values in OPTION_GRID.items()}
    return draw_problem(rng, batch, dim, guide_dim, rng.choice(NEGATIVE_COUNTS), options=options)


def upstream_weight(problem: Problem, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
    """A random incoming gradient: a scalar for mean/sum, a (B,) vector for reduction='none'.

    Drawn on the CPU (the same values on every device), returned on `device`."""
    gen = torch.Generator().manual_seed(SESSION_SEED)
    if problem.options.get("reduction", "mean") == "none":
        weight = torch.randn(problem.student[0].shape[0], generator=gen, dtype=torch.float64)
    else:
        weight = torch.rand((), generator=gen, dtype=torch.float64) + 0.5
    return weight.to(device=device, dtype=dtype)


def loss_and_grads(loss_fn, problem: Problem, dtype: torch.dtype, **extra) -> tuple[Tensor, list[Tensor]]:
    """Run `loss_fn(anchor, positive, guide_anchor, guide_positive, negatives, guide_negatives, **options)`
    on `problem` cast to `dtype`; return the loss and the student gradients for a random upstream weight."""
    student, guide = problem.args(dtype)
    negatives = student[2:] or None
    guide_negatives = guide[2:] or None
    loss = loss_fn(student[0], student[1], guide[0], guide[1], negatives, guide_negatives, **problem.options, **extra)
    weight = upstream_weight(problem, loss.dtype, loss.device)  # on the loss's device (a GPU's too)
    grads = torch.autograd.grad((loss * weight).sum(), student)
    return loss.detach(), list(grads)


def oracle(problem: Problem, input_dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
    """The float64 reference, evaluated on the inputs rounded to `input_dtype` (so rounding of the
    inputs themselves is not counted as an error of the backend under test)."""
    rounded = Problem(
        [t.to(input_dtype).to(torch.float64) for t in problem.student],
        [t.to(input_dtype).to(torch.float64) for t in problem.guide],
        problem.options,
    )

    reference = functools.partial(gist_fast.gist_loss, backend="reference")
    return loss_and_grads(reference, rounded, torch.float64)


def assert_close_scaled(actual: Tensor, expected: Tensor, tol: float, what: str, floor: float = 1e-12) -> None:
    """|actual - expected| <= tol * max(max|expected|, floor), elementwise, with a readable message.

    `floor` is the magnitude below which values count as zero: a saturated softmax gives losses of
    1e-10 whose absolute error is set by the logits' scale 1/temperature, not by their own size."""
    # Compared on the CPU: a GPU result against a CPU oracle (or the reverse) needs no moving by callers.
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(expected.abs().max().item(), floor)
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}"


def assert_matches_oracle(loss_fn, problem: Problem, dtype: torch.dtype, **extra) -> None:
    """Loss and every student gradient of `loss_fn` at `dtype` match the float64 oracle."""
    tol = TOLERANCES[dtype]
    expected_loss, expected_grads = oracle(problem, dtype)
    loss, grads = loss_and_grads(loss_fn, problem, dtype, **extra)
    context = problem.describe()
    # Logits are cosines / temperature: that sets the scale of rounding errors near zero.
    logit_scale = 1.0 / problem.options.get("temperature", 0.01)
    weight = upstream_weight(problem).abs().max().item()
    summed_rows = problem.student[0].shape[0] if problem.options.get("reduction") == "sum" else 1
    loss_floor = 0.1 * logit_scale * summed_rows  # a sum adds up B rows' round-off
    assert_close_scaled(loss, expected_loss, tol["loss"], f"loss [{context}]", floor=loss_floor)
    names = ["anchor", "positive"] + [f"negatives[{m}]" for m in range(problem.k)]
    for name, g, e, t in zip(names, grads, expected_grads, problem.student, strict=True):
        assert g.dtype == dtype, f"grad of {name} has dtype {g.dtype}, expected {dtype}"
        assert g.shape == t.shape
        floor = gradient_floor(problem, t, weight)
        assert_close_scaled(g, e, tol["grad"], f"grad {name} [{context}]", floor=floor)


def gradient_floor(problem: Problem, student_input: Tensor, weight: float = 1.0, rows: int | None = None) -> float:
    """The gradient magnitude of `student_input` below which entries count as round-off.

    `rows`: how many rows' weighted losses a column's gradient sums (default: 1 for a mean, B else).

    dx = (dx̂ - x̂(x̂·dx̂)) / ||x||: cancellation noise scales with |dx̂| / ||x||, and |dx̂| of a
    column sums up to B rows of weight/temperature (d = 1 makes the exact gradient 0: all noise).
    A saturated softmax (temperature 0.01) likewise leaves gradients of 1e-48 exactly and about
    eps * |logit| / temperature as computed: the backends form exp(z - lse) with z - lse in one product."""
    logit_scale = 1.0 / problem.options.get("temperature", 0.01)
    inv_norm = 1.0 / student_input.norm(dim=1).min().item()
    if rows is None:
        rows = 1 if problem.options.get("reduction", "mean") == "mean" else problem.student[0].shape[0]
    return 5e-2 * logit_scale * weight * inv_norm * rows
