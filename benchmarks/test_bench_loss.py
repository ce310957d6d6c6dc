"""pytest-benchmark: forward+backward of the GIST loss on the CPU, every method on the same inputs.

"reference" and "torch" (gist_fast's backends) and sentence-transformers' GISTEmbedLoss (embeddings
injected) at small batches, d = dg = 384, one negative column, fp32. Each benchmark also checks its
loss and anchor gradient against gist_fast's reference computed in float64 on the same inputs, so a
benchmark cannot silently time a wrong computation. sentence-transformers stops at B = 256: its
broadcast B x N x d temporaries need ~17 GB at B = 1024.

    .venv/bin/python -m pytest benchmarks/test_bench_loss.py                      # checks only
    .venv/bin/python -m pytest benchmarks/test_bench_loss.py --benchmark-enable   # timings too

(pyproject's addopts pass --benchmark-disable, which runs each function once, untimed.)
The large-batch table with peak memory is bench_loss_cpu.py's job.
"""

from __future__ import annotations

import functools

import pytest
import torch
from bench_loss_cpu import TEMPERATURE, make_inputs
from st_injection import make_st_gist_loss, st_gist_loss

import gist_fast

CASES = [
    ("reference", 256),
    ("torch", 256),
    ("sentence-transformers", 256),
    ("reference", 1024),
    ("torch", 1024),
]
# fp32 against float64: cosines carry ~1e-7 relative error, amplified by 1/temperature = 100 in
# the logits; the loss is O(1) and the gradients O(1/B).
LOSS_ATOL = 1e-4
GRAD_ATOL = 1e-5


@functools.cache
def inputs(batch: int):
    student, guide = make_inputs(batch)
    return [x.detach() for x in student], guide


@functools.cache
def float64_reference(batch: int) -> tuple[float, torch.Tensor]:
    student, guide = inputs(batch)
    s64 = [x.double().requires_grad_() for x in student]
    g64 = [x.double() for x in guide]
    loss = gist_fast.gist_loss(
        s64[0], s64[1], g64[0], g64[1], s64[2], g64[2], temperature=TEMPERATURE, backend="reference"
    )
    (grad_anchor,) = torch.autograd.grad(loss, s64[0])
    return loss.item(), grad_anchor.float()


def forward_backward(method: str, student: list[torch.Tensor], guide: list[torch.Tensor]):
    """The loss and d loss / d anchor, as the training step would need them."""
    if method == "sentence-transformers":
        loss = st_gist_loss(student[0], student[1], guide[0], guide[1], student[2], guide[2], loss=ST_LOSS)
    else:
        loss = gist_fast.gist_loss(
            student[0], student[1], guide[0], guide[1], student[2], guide[2], temperature=TEMPERATURE, backend=method
        )
    grads = torch.autograd.grad(loss, student)
    return loss.detach(), grads[0]


ST_LOSS = make_st_gist_loss(temperature=TEMPERATURE)


@pytest.mark.parametrize(("method", "batch"), CASES, ids=[f"{m}-B{b}" for m, b in CASES])
def test_forward_backward(benchmark, method: str, batch: int) -> None:
    student, guide = inputs(batch)
    student = [x.clone().requires_grad_() for x in student]
    expected_loss, expected_grad = float64_reference(batch)

    benchmark.group = f"B={batch}"
    benchmark.extra_info.update({"method": method, "batch": batch, "dim": student[0].shape[1]})
    rounds = 2 if method == "sentence-transformers" else 5
    loss, grad_anchor = benchmark.pedantic(
        forward_backward, args=(method, student, guide), rounds=rounds, iterations=1, warmup_rounds=1
    )

    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected_loss, abs=LOSS_ATOL), f"{method} loss differs from the reference"
    torch.testing.assert_close(grad_anchor, expected_grad, atol=GRAD_ATOL, rtol=1e-3)
