"""Exact ties of the guide's mask, on every backend and dtype, against the float64 reference.

A logit whose pair of guide rows is bitwise the pair that sets the row's threshold (anchor,
positive), up to order, has guide similarity equal to t_i in exact arithmetic: it is masked exactly
when margin > 0 (absolute) or |t_i| * margin > 0 (relative), whatever each backend's rounding says
(gist_fast/backends/ties.py). Real batches are full of such pairs: a negative that is another row's
positive, a row whose positive repeats its anchor, duplicated texts. The inputs here are random
(not exactly representable) with those repetitions planted; before the rule, the anchor = positive
row's loss flipped between 0 and log 3 with the rounding.

Tolerances as in test_loss.py (problems.TOLERANCES): float64 1e-9; float32 loss 2e-5 / gradients
1e-4; float16 2e-5 / 2e-3; bfloat16 2e-5 / 1.6e-2, relative to the largest magnitude compared. The
oracle is the float64 reference on the inputs rounded to the tested dtype (which keeps bitwise
equal rows equal).
"""

from __future__ import annotations

import random

import pytest
import torch
from problems import (
    TOLERANCES,
    Problem,
    assert_close_scaled,
    assert_matches_oracle,
    draw_gathered,
    draw_problem,
    gradient_floor,
    rng_for,
)

import gist_fast

ON_GPU = torch.cuda.is_available()
# (A margin of 1e-9 is below float32's rounding of the similarities: only the exact rule masks the tie.)
MARGINS = [("absolute", 0.0), ("absolute", 0.05), ("absolute", -0.05), ("absolute", 1e-9)]
MARGINS += [("relative", 0.0), ("relative", 0.1), ("relative", -0.1)]
# The interpreter is slow: each dtype of the Triton backends takes a share of the margins (margin 0,
# where rounding decides most often without the rule, in every share).
TRITON_MARGINS = {
    torch.float32: [("absolute", 0.0), ("relative", 0.1), ("absolute", 1e-9)],
    torch.bfloat16: [("relative", 0.0), ("absolute", -0.05)],
    torch.float16: [("absolute", 0.0), ("absolute", 0.05), ("relative", -0.1)],
}

# backend -> dtypes it is tested at (the Triton backend hands float64 to the torch one).
BACKEND_DTYPES = {
    "reference": [torch.float64, torch.float32],
    "torch": [torch.float64, torch.float32, torch.bfloat16, torch.float16],
    "cpp": [torch.float64, torch.float32, torch.bfloat16, torch.float16],
    "triton": [torch.float32, torch.bfloat16, torch.float16],
    "triton_chunked": [torch.float32, torch.bfloat16, torch.float16],
}
CASES = [(backend, dtype) for backend, dtypes in BACKEND_DTYPES.items() for dtype in dtypes]
# The float64 reference is the oracle itself; it is checked through its float32 run and the others.
ORACLE_CHECKED = [case for case in CASES if case != ("reference", torch.float64)]


def backend_fn(backend: str):
    """`gist_loss` with `backend`; the Triton backends run on the GPU when there is one (else the
    interpreter), and the loss comes back on the CPU, so gradients reach the CPU leaves."""
    if backend.startswith("triton"):
        pytest.importorskip("triton")
    device = "cuda" if ON_GPU and backend.startswith("triton") else "cpu"

    def move(t):
        if t is None:
            return None
        return [x.to(device) for x in t] if isinstance(t, list) else t.to(device)

    def loss_fn(*args, **options):
        return gist_fast.gist_loss(*(move(t) for t in args), backend=backend, **options).cpu()

    return loss_fn


def plant_ties(problem: Problem, rng: random.Random) -> Problem:
    """Repetitions real data has, in student and guide alike (the same text embedded twice):
    row 0's positive is its anchor; each negative column repeats the positives of other rows (and
    one row's own positive); two rows share a positive; two anchors are duplicates; a positive
    repeats another row's anchor and an anchor another row's positive."""
    a, p, *negs = problem.student
    ga, gp, *gnegs = problem.guide
    B = a.shape[0]
    p[0], gp[0] = a[0], ga[0]
    for n, gn in zip(negs, gnegs, strict=True):
        source = list(range(B))
        rng.shuffle(source)
        for j in range(0, B, 2):  # half the negatives repeat a positive
            n[j], gn[j] = p[source[j]], gp[source[j]]
        n[1], gn[1] = p[1], gp[1]  # row 1's negative is its own positive
    if B >= 6:
        p[4], gp[4] = p[2], gp[2]
        a[5], ga[5] = a[3], ga[3]
    if B >= 10:
        p[7], gp[7] = a[6], ga[6]  # a positive repeats another row's anchor (PP ties with row 6)
        a[9], ga[9] = p[8], gp[8]  # an anchor repeats another row's positive (AA ties with row 8)
    return problem


def tie_problem(key, batch: int = 18, dims=(12, 20), k: int = 2, **options) -> Problem:
    rng = rng_for("ties", *key)
    opts = {"temperature": rng.choice([0.05, 0.1]), "reduction": rng.choice(["mean", "sum", "none"])}
    opts |= {"contrast_anchors": rng.random() < 0.8, "contrast_positives": rng.random() < 0.8} | options
    problem = draw_problem(rng, batch, dims[0], dims[1], k, options=opts)
    return plant_ties(problem, rng)


@pytest.mark.parametrize(("backend", "dtype"), ORACLE_CHECKED, ids=lambda v: str(v).replace("torch.", ""))
def test_planted_ties_match_the_exact_rule(backend, dtype):
    """Every margin strategy and sign of margin: loss and gradients match the float64 reference,
    which decides the planted ties exactly."""
    fn = backend_fn(backend)
    interpreted = backend.startswith("triton") and not ON_GPU
    for strategy, margin in TRITON_MARGINS[dtype] if interpreted else MARGINS:
        shape = {"batch": 17, "k": 1} if interpreted else {}
        problem = tie_problem((backend, dtype, strategy, margin), margin_strategy=strategy, margin=margin, **shape)
        assert_matches_oracle(fn, problem, dtype)


@pytest.mark.parametrize(
    ("backend", "dtype"), [c for c in CASES if c[0] != "reference"], ids=lambda v: str(v).replace("torch.", "")
)
def test_anchor_equal_to_positive_over_seeds(backend, dtype):
    """The issue's case: p[0] = a[0], gp[0] = ga[0], otherwise random (here rows 0-5 alike). At
    margin 0 the AA and PP diagonals of such a row tie with t_i = 1 and are kept, so its loss is
    log 3 (three equal logits), on every draw; at margin 0.05 they are masked and the loss is 0. (tau = 0.01 puts every
    other logit about 70 below those three.) The reference's two rounded similarities happen to be
    the same matmul entry here, so it is covered by the planted-ties test instead."""
    fn = backend_fn(backend)
    draws = 3 if backend.startswith("triton") and not ON_GPU else 8
    for trial in range(draws):
        gen = torch.Generator().manual_seed(rng_for("anchor=positive", backend, dtype, trial).getrandbits(63))
        a, p, ga, gp = (torch.randn(16, 64, generator=gen, dtype=torch.float64).to(dtype) for _ in range(4))
        p[:6], gp[:6] = a[:6], ga[:6]
        for margin, expected in [(0.0, torch.log(torch.tensor(3.0)).item()), (0.05, 0.0)]:
            loss = fn(a, p, ga, gp, None, None, temperature=0.01, margin=margin, reduction="none")[:6]
            torch.testing.assert_close(loss, torch.full_like(loss, expected), atol=1e-3, rtol=0)


def _gathered(backend: str, student, guide, dtype, offset: int, **options):
    """Loss (B,) and student gradients of loss.sum() on a gathered problem (P = world * B)."""
    from gist_fast.backends import get_backend
    from gist_fast.inputs import validate

    device = "cuda" if ON_GPU and backend.startswith("triton") else "cpu"
    s = [t.to(dtype).requires_grad_() for t in student]
    g = [t.to(dtype).to(device) for t in guide]
    moved = [t.to(device) for t in s]
    inputs, opts = validate(
        moved[0], moved[1], g[0], g[1], moved[2:], g[2:], offset=offset, expected_candidates=student[1].shape[0],
        **options,
    )  # fmt: skip
    loss = get_backend(backend, inputs)(inputs, opts).cpu()
    return loss, torch.autograd.grad(loss.sum(), s)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "triton_chunked"])
def test_ties_with_gathered_candidates(backend):
    """Rank 1 of 2 (offset B), float32 against the float64 reference: the ids are taken over all
    gathered candidates, and the tie of anchor i is with candidate o + i's guide row."""
    if backend.startswith("triton"):
        pytest.importorskip("triton")
    rng = rng_for("ties-gathered", backend)
    B, world, rank = 9, 2, 1
    student, guide = draw_gathered(rng, B, world, rank, 8, 10, 1)
    o = rank * B
    for i in (0, 5, 7):  # anchors equal to their positives
        student[1][o + i], guide[1][o + i] = student[0][i], guide[0][i]
    for j in range(0, 2 * B, 2):  # negatives repeating positives, ours (o + 2 ...) and rank 0's
        source = (j + 2) % (2 * B)
        student[2][j], guide[2][j] = student[1][source], guide[1][source]
    student[1][1], guide[1][1] = student[1][o + 4], guide[1][o + 4]  # rank 0's positive repeats one of ours
    dtype = torch.float32
    tol = TOLERANCES[dtype]
    for strategy, margin in MARGINS if backend in ("torch", "cpp") or ON_GPU else MARGINS[:1] + MARGINS[3:5]:
        options = {"temperature": 0.05, "margin_strategy": strategy, "margin": margin, "reduction": "none"}
        options |= {"contrast_anchors": True, "contrast_positives": True}
        loss, grads = _gathered(backend, student, guide, dtype, o, **options)
        rounded = [[t.to(dtype).double() for t in side] for side in (student, guide)]
        want, want_grads = _gathered("reference", *rounded, torch.float64, o, **options)
        what = f"{backend} {strategy} {margin}"
        assert_close_scaled(loss, want, tol["loss"], f"loss {what}", floor=0.1 / 0.05)
        problem = Problem(student, guide, options)
        for x, g, w in zip(student, grads, want_grads, strict=True):
            floor = gradient_floor(problem, x, rows=B)
            assert_close_scaled(g, w, tol["grad"], f"grad {what}", floor=floor)


def test_relative_margin_tie_with_zero_target_similarity():
    """|t_i| * margin > 0 is false when t_i = 0 exactly: a tie is then kept even at a positive
    relative margin, while the absolute margin masks it."""
    ga = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    gp = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # t = 0 for both rows
    a, p = torch.randn(2, 2, 3, dtype=torch.float64).unbind(0)
    kw = {"temperature": 1.0, "reduction": "none", "contrast_anchors": True, "contrast_positives": False}
    cos = lambda x, y: torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(y, dim=1).T  # noqa: E731
    # Row 0's threshold pair is (ga_0, gp_0) = (e1, e2); AA's column 1 is ga_1 = e2 = gp_0: a tie.
    # AP's column 1 (gp_1 = e1) and AA's diagonal have g = 1 > thr: masked. Row 1 likewise.
    for backend in ("reference", "torch", "cpp"):
        relative = gist_fast.gist_loss(a, p, ga, gp, margin_strategy="relative", margin=0.5, backend=backend, **kw)
        absolute = gist_fast.gist_loss(a, p, ga, gp, margin_strategy="absolute", margin=0.5, backend=backend, **kw)
        ap, aa = cos(a, p), cos(a, a)
        # relative: thr = 0; kept: the target, the AA tie (and AA diagonal g = 1 > 0 is masked).
        want_rel = torch.logsumexp(torch.stack([ap.diagonal(), aa.flip(1).diagonal()], 1), 1) - ap.diagonal()
        torch.testing.assert_close(relative, want_rel)
        torch.testing.assert_close(absolute, torch.zeros(2, dtype=torch.float64))


# --- the ids -------------------------------------------------------------------------------------


def _bitwise_equal_pairs(rows: torch.Tensor) -> torch.Tensor:
    bits = rows.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[rows.element_size()])
    return (bits[:, None, :] == bits[None, :, :]).all(-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_ids_are_equal_exactly_for_bitwise_equal_rows(dtype):
    """Random rows with repeats across tensors, rows differing in one bit, and -0.0 vs 0.0."""
    from gist_fast.backends.ties import guide_row_ids

    gen = torch.Generator().manual_seed(rng_for("ids", dtype).getrandbits(63))
    x, y, z = (torch.randn(30, 7, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    y[::3] = x[torch.randperm(30, generator=gen)[:10]]
    z[5] = y[0]
    z[6] = x[1]
    z[7] = x[1]
    z[8] = 0.0
    z[9] = 0.0
    z[9, 2] = -0.0  # equal to z[8] as a number, not bitwise
    bits = z[10].contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[z.element_size()])
    bits[3] ^= 1  # z[10] = z[11] but for the last bit of one feature
    z[11] = z[10]
    bits[3] ^= 1
    z[12] = x[2]
    z[13] = -x[2]  # the sign bits alone differ (a pattern a plain linear hash mod 2^32 cannot see)
    z[13, 2:] = x[2, 2:]
    ids = torch.cat(guide_row_ids([x, y, z]))
    same = _bitwise_equal_pairs(torch.cat([x, y, z]))
    assert torch.equal(ids[:, None] == ids[None, :], same)
    assert ids[8 + 60] != ids[9 + 60] and ids[10 + 60] != ids[11 + 60]
    assert same.sum() > 90  # repeats really were planted


def test_ids_survive_hash_collisions(monkeypatch):
    """With every row hashed alike (a forced collision), the bytewise check still tells rows apart."""
    from gist_fast.backends import ties

    monkeypatch.setattr(ties, "row_hashes", lambda bits, weights: torch.zeros(bits.shape[0], dtype=torch.int64))
    monkeypatch.setattr(ties, "_DEFAULT_CHUNK_ELEMENTS", 16)  # several chunks of rows
    gen = torch.Generator().manual_seed(rng_for("ids-collide").getrandbits(63))
    x, y = torch.randn(2, 25, 5, generator=gen).unbind(0)
    y[:10] = x[10:20]
    x[3] = -0.0
    x[4] = 0.0
    ids = torch.cat(ties.guide_row_ids([x, y]))
    assert torch.equal(ids[:, None] == ids[None, :], _bitwise_equal_pairs(torch.cat([x, y])))


def test_ids_of_mixed_dtypes_compare_values():
    """Tensors of different dtypes are compared after the exact promotion to their common dtype."""
    from gist_fast.backends.ties import guide_row_ids

    x = torch.randn(6, 4).to(torch.float16)
    y = x.to(torch.float32)
    y[2] += 1e-3  # not representable in float16: differs
    ids_x, ids_y = guide_row_ids([x, y])
    assert torch.equal(ids_x == ids_y, torch.tensor([True, True, False, True, True, True]))
