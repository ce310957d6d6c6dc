"""Candidates gathered over torch.distributed, with gradient, for the gathered GIST loss.

With ``gather_across_devices=True`` every process scores its own B anchors against the candidates
of all W processes: positives, negatives and their guide embeddings are all-gathered (P = W·B rows),
the anchors stay local, and anchor i's positive sits at column ``rank·B + i`` (docs/loss.md).

The gradient semantics are those of ``torch.distributed.nn.all_gather``, which sentence-transformers'
``all_gather_with_grad`` uses: the gradient that reaches a process's local candidates is the sum,
over all processes, of the gradient of each process's own loss with respect to them (a
reduce-scatter with SUM). So when every process back-propagates its own loss, the local gradients
are those of the sum of the per-process losses; DistributedDataParallel then averages parameter
gradients over processes, which makes the step that of the mean of the per-process losses.
Guide embeddings are gathered without gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor

from .inputs import GISTInputs, GISTOptions

# Backends with a native reduce-scatter on accelerator tensors; elsewhere (gloo) the backward pass
# all-reduces the gathered gradient and keeps the local slice, which moves W times more data but
# works with every backend and torch version.
_REDUCE_SCATTER_BACKENDS = ("nccl", "xccl")


def _has_reduce_scatter(group: dist.ProcessGroup | None, tensor: Tensor) -> bool:
    backend = str(dist.get_backend(group)).lower()
    return tensor.device.type != "cpu" and any(name in backend for name in _REDUCE_SCATTER_BACKENDS)


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when torch.distributed is initialised and the group holds more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: reduce-scatter (SUM) of the gathered gradient."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        world = dist.get_world_size(group)
        ctx.group, ctx.rank, ctx.world = group, dist.get_rank(group), world
        tensor = tensor.contiguous()
        chunks = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(chunks, tensor, group=group)
        return torch.cat(chunks, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        if _has_reduce_scatter(ctx.group, grad):
            chunks = list(grad.chunk(ctx.world, dim=0))
            local = torch.empty_like(chunks[ctx.rank])
            dist.reduce_scatter(local, chunks, op=dist.ReduceOp.SUM, group=ctx.group)
            return local, None
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        rows = grad.shape[0] // ctx.world
        return total[ctx.rank * rows : (ctx.rank + 1) * rows], None


def all_gather_with_grad(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate ``tensor`` (rows, ...) from every process in rank order: (world·rows, ...).

    Differentiable: the local input receives the sum over processes of the gradients of their
    slices. Every process must pass a tensor of the same shape, dtype and device. Without an
    initialised process group of two or more processes, ``tensor`` is returned as it is.
    """
    if not is_distributed(group):
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


@torch.no_grad()
def all_gather_no_grad(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """`all_gather_with_grad` for tensors that need no gradient (the guide's embeddings)."""
    if not is_distributed(group):
        return tensor.detach()
    tensor = tensor.detach().contiguous()
    chunks = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(chunks, tensor, group=group)
    return torch.cat(chunks, dim=0)


def _gather_columns(columns: Sequence[Tensor], group: dist.ProcessGroup | None, with_grad: bool) -> list[Tensor]:
    """Gather k (B, d) columns into k (W·B, d) ones: one collective when they share a dtype."""
    gather = all_gather_with_grad if with_grad else all_gather_no_grad
    if len(columns) == 1 or len({t.dtype for t in columns}) > 1:
        return [gather(t, group) for t in columns]
    # (B, k, d) -> (W·B, k, d) in rank order; column m is the strided view [:, m].
    stacked = gather(torch.stack(list(columns), dim=1), group)
    return list(stacked.unbind(1))


def _check_same_shapes(inputs: GISTInputs, group: dist.ProcessGroup | None) -> None:
    """Every process must hold the same number of rows, dims and negative columns, or the gather would
    hang or misplace the targets; check it with one small all-gather so that every process raises."""
    shape = [inputs.batch_size, inputs.anchor.shape[1], inputs.guide_anchor.shape[1], len(inputs.negatives)]
    local = torch.tensor(shape, dtype=torch.int64, device=inputs.anchor.device)
    shapes = all_gather_no_grad(local.unsqueeze(0), group)
    if not bool((shapes == local).all()):
        per_rank = {rank: tuple(row.tolist()) for rank, row in enumerate(shapes)}
        raise ValueError(
            "gather_across_devices needs the same batch size, embedding dims and number of negative columns "
            f"on every process; got (batch, dim, guide_dim, negatives) by rank: {per_rank}"
        )


def gather_candidates(
    inputs: GISTInputs, options: GISTOptions, group: dist.ProcessGroup | None = None
) -> tuple[GISTInputs, GISTOptions]:
    """All-gather the candidates of validated local inputs (P = B) over ``group``.

    Returns inputs whose positives and negatives (student, with gradient) and guide positives and
    negatives (without) have W·B rows in rank order, the local anchors unchanged, and options whose
    offset is ``rank·B``. Without an initialised group of two or more processes, returns the inputs
    unchanged.
    """
    if not is_distributed(group):
        return inputs, options
    batch = inputs.batch_size
    _check_same_shapes(inputs, group)
    positive, *negatives = _gather_columns((inputs.positive, *inputs.negatives), group, with_grad=True)
    guide_positive, *guide_negatives = _gather_columns(
        (inputs.guide_positive, *inputs.guide_negatives), group, with_grad=False
    )
    gathered = GISTInputs(
        anchor=inputs.anchor,
        positive=positive,
        negatives=tuple(negatives),
        guide_anchor=inputs.guide_anchor,
        guide_positive=guide_positive,
        guide_negatives=tuple(guide_negatives),
    )
    return gathered, replace(options, offset=dist.get_rank(group) * batch)
