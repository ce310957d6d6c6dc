"""The gathered loss (``gather_across_devices=True``) over 2 and 3 CPU processes (gloo).

The test spawns the processes itself (torch.multiprocessing, a free localhost port). Every rank
holds B rows of a problem drawn here over W·B rows and scores its anchors against every rank's
candidates. Expected, from one process: the reference over (local anchors, all candidates) with the
target offset rank·B; with ``contrast_anchors=False`` that is also the full concatenated batch's loss
restricted to the rank's rows. The ranks' input gradients, put side by side, must equal the
gradients of the single-process sum of the per-rank losses, each weighted by the upstream gradient
that rank used.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from problems import SESSION_SEED, Problem, draw_problem, gradient_floor, rng_for

import gist_fast
import gist_fast.distributed as gist_distributed
from gist_fast.backends import BACKENDS
from gist_fast.distributed import all_gather_with_grad, is_distributed

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}

# (backend, dtype): float64 for the exact backends; the Triton kernel (interpreted on a CPU) in float32.
BACKEND_DTYPES = [("reference", torch.float64), ("torch", torch.float64)]
if "triton" in BACKENDS:
    BACKEND_DTYPES += [("triton", torch.float32), ("triton_chunked", torch.float32)]

OPTION_SETS = [
    {"contrast_anchors": True, "contrast_positives": True, "margin_strategy": "absolute", "margin": 0.05},
    {"contrast_anchors": False, "contrast_positives": True, "margin_strategy": "relative", "margin": 0.1},
    {"contrast_anchors": False, "contrast_positives": False, "margin_strategy": "absolute", "margin": 0.0},
    {"contrast_anchors": True, "contrast_positives": False, "margin_strategy": "relative", "margin": -0.1},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cases(world: int) -> list[dict]:
    """Problems over world·B rows, the options, the backend and per-rank upstream weights."""
    cases = []
    for index, (backend, dtype) in enumerate(BACKEND_DTYPES * 2):
        rng = rng_for("distributed", world, index)
        options = dict(OPTION_SETS[(index + world) % len(OPTION_SETS)])
        options["temperature"] = rng.choice([0.05, 0.1])
        options["reduction"] = ["mean", "sum", "none"][index % 3]
        batch = rng.choice([1, 3, 4])
        k = [0, 2, 1][index % 3]
        problem = draw_problem(rng, world * batch, 7, 5, k, options=options)
        gen = torch.Generator().manual_seed(rng.getrandbits(63))
        rows = world * batch if options["reduction"] == "none" else world
        weights = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5
        cases.append(
            {
                "backend": backend,
                "dtype": dtype,
                "batch": batch,
                "student": [t.to(dtype) for t in problem.student],
                "guide": [t.to(dtype) for t in problem.guide],
                "options": options,
                "weights": weights,
                "use_module": index % 2 == 1,
                # Take the NCCL backward branch (reduce-scatter) on gloo, which has it in torch 2.13.
                "reduce_scatter": index % 4 < 2,
            }
        )
    return cases


def rank_rows(tensor: torch.Tensor, rank: int, batch: int) -> torch.Tensor:
    return tensor[rank * batch : (rank + 1) * batch]


def rank_weight(case: dict, rank: int) -> torch.Tensor:
    if case["options"]["reduction"] == "none":
        return rank_rows(case["weights"], rank, case["batch"])
    return case["weights"][rank]


def _worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        cases = torch.load(os.path.join(path, "cases.pt"), weights_only=False)
        results = []
        all_reduce_branch = gist_distributed._has_reduce_scatter
        for case in cases:
            gist_distributed._has_reduce_scatter = (
                (lambda group, t: True) if case["reduce_scatter"] else all_reduce_branch
            )
            batch, dtype = case["batch"], case["dtype"]
            student = [rank_rows(t, rank, batch).clone().to(dtype).requires_grad_() for t in case["student"]]
            guide = [rank_rows(t, rank, batch).clone().to(dtype) for t in case["guide"]]
            options = dict(case["options"], backend=case["backend"], gather_across_devices=True)
            args = (student[0], student[1], guide[0], guide[1], student[2:] or None, guide[2:] or None)
            loss_fn = (
                gist_fast.GISTLoss(**options)
                if case["use_module"]
                else functools.partial(gist_fast.gist_loss, **options)
            )
            loss = loss_fn(*args)
            weight = rank_weight(case, rank).to(loss.dtype)
            grads = torch.autograd.grad((loss * weight).sum(), student)
            results.append({"loss": loss.detach(), "grads": [g.detach() for g in grads]})

        # Unequal batches must raise on every rank, not hang.
        rows = 2 if rank == 0 else 3
        a, p, ga, gp = torch.randn(4, rows, 4).unbind(0)
        try:
            gist_fast.gist_loss(a, p, ga, gp, gather_across_devices=True)
            results.append({"unequal_batches": "no error"})
        except ValueError as error:
            results.append({"unequal_batches": str(error)})
        torch.save(results, os.path.join(path, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def reference_rank_loss(case: dict, rank: int, student: list[torch.Tensor], guide: list[torch.Tensor]):
    """One process: rank's anchors against all candidates, target offset rank·B (docs/loss.md)."""
    from gist_fast.backends.reference import gist_loss_reference
    from gist_fast.inputs import validate

    batch, world_rows = case["batch"], student[0].shape[0]
    inputs, options = validate(
        rank_rows(student[0], rank, batch),
        student[1],
        rank_rows(guide[0], rank, batch),
        guide[1],
        student[2:] or None,
        guide[2:] or None,
        **case["options"],
        offset=rank * batch,
        expected_candidates=world_rows,
    )
    return gist_loss_reference(inputs, options)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, floor: float) -> None:
    """|actual - expected| <= tol * max(max|expected|, floor). Logits are cosines / temperature, so
    rounding errors scale with 1/temperature even where a saturated softmax makes the loss tiny."""
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(expected.abs().max().item(), floor)
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g} (seed {SESSION_SEED})"


@pytest.mark.parametrize("world", [2, 3])
def test_gathered_loss_matches_single_process(world, tmp_path):
    cases = make_cases(world)
    torch.save(cases, tmp_path / "cases.pt")
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world)]

    for index, case in enumerate(cases):
        what = f"case {index} ({case['backend']}, {case['dtype']}, B={case['batch']}, {case['options']})"
        tol = TOLERANCE[case["dtype"]]
        logit_scale = 1.0 / case["options"]["temperature"]
        loss_floor = 1e-2 * logit_scale
        student = [t.to(torch.float64).requires_grad_() for t in case["student"]]
        guide = [t.to(torch.float64) for t in case["guide"]]
        total = 0
        for rank in range(world):
            expected = reference_rank_loss(case, rank, student, guide)
            assert_close(per_rank[rank][index]["loss"], expected, tol, f"{what} rank {rank} loss", loss_floor)
            total = total + (expected * rank_weight(case, rank)).sum()
        if not case["options"]["contrast_anchors"] and case["options"]["reduction"] == "none":
            # Without the anchor-anchor block, the rank's rows are those of the whole batch.
            from gist_fast.backends.reference import gist_loss_reference
            from gist_fast.inputs import validate

            whole = gist_loss_reference(
                *validate(
                    student[0],
                    student[1],
                    guide[0],
                    guide[1],
                    student[2:] or None,
                    guide[2:] or None,
                    **case["options"],
                )
            )
            losses = torch.cat([per_rank[rank][index]["loss"] for rank in range(world)])
            assert_close(losses, whole, tol, f"{what} whole-batch rows", loss_floor)
        expected_grads = torch.autograd.grad(total, student)
        # The ranks' weighted losses add up: a column sums W means, or all W·B rows' losses.
        problem = Problem(case["student"], case["guide"], case["options"])
        rows = world if case["options"]["reduction"] == "mean" else world * case["batch"]
        weight = case["weights"].max().item()
        for column, expected in enumerate(expected_grads):
            got = torch.cat([per_rank[rank][index]["grads"][column] for rank in range(world)])
            assert got.dtype == case["dtype"]
            grad_floor = gradient_floor(problem, case["student"][column].double(), weight, rows)
            assert_close(got, expected, tol, f"{what} grad of student column {column}", grad_floor)

    for rank in range(world):
        message = per_rank[rank][-1]["unequal_batches"]
        assert "same batch size" in message and "by rank" in message, message


def test_gather_without_process_group_is_a_no_op():
    assert not is_distributed()
    a, p, n = torch.randn(3, 5, 8, dtype=torch.float64).unbind(0)
    ga, gp, gn = torch.randn(3, 5, 6, dtype=torch.float64).unbind(0)
    assert all_gather_with_grad(a) is a
    plain = gist_fast.gist_loss(a, p, ga, gp, n, gn, temperature=0.05, backend="reference")
    gathered = gist_fast.gist_loss(
        a, p, ga, gp, n, gn, temperature=0.05, backend="reference", gather_across_devices=True
    )
    assert torch.equal(plain, gathered)


def test_gather_flag_must_be_bool():
    a, p, ga, gp = torch.randn(4, 3, 4).unbind(0)
    with pytest.raises(TypeError, match="gather_across_devices"):
        gist_fast.gist_loss(a, p, ga, gp, gather_across_devices=1)
