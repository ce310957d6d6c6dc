"""Training on several processes (``torchrun``): ranks, shards of each batch, one gradient all-reduce.

Under ``torchrun --nproc_per_node W`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``MASTER_ADDR``/``MASTER_PORT``), :func:`setup` joins the process group (NCCL on CUDA, gloo on
CPU) and puts each process on ``cuda:LOCAL_RANK``. Every rank builds the same sequence of global
batches (same data, same seed) and encodes its slice of each: rows ``rank·b .. (rank+1)·b`` with
``b = batch_size / W``. The loss is computed with ``gather_across_devices=True``: every rank scores
its ``b`` anchors against the candidates of all ranks, and the all-gather's backward returns to each
rank's candidates the gradient of every rank's loss with respect to them.

Gradient semantics. Rank r's loss is the mean over its b rows, ``L_r = (1/b) Σ_{i∈r} l_i``, so
``Σ_r L_r = W · (1/B) Σ_i l_i = W · L`` where L is the single-process loss of the global batch. The
gathered backward makes each rank's parameter gradient that rank's share of ``d(Σ_r L_r)/dθ``;
summing the ranks' gradients and dividing by W (what DistributedDataParallel does) gives ``dL/dθ``,
the single-process gradient. :func:`all_reduce_gradients` does that sum-and-divide once per step.

Why not the DistributedDataParallel wrapper: a GradCache step runs many forward/backward passes
per optimizer step (every mini-batch is re-encoded with grad and back-propagated on its own), so
DDP would need ``no_sync()`` around all but the last mini-batch and would then all-reduce the
accumulated gradients during the last backward. That is the same sum-and-divide as one all-reduce
after the last backward, which overlaps with at most one mini-batch's backward. The explicit
all-reduce also works with parameters that get no gradient (e.g. a BERT pooler the embedding does not
use, which DDP rejects unless ``find_unused_parameters``), with gradient checkpointing, and keeps the
encoder unwrapped (its ``save`` and ``state_dict`` names stay those of the model). Parameters are
broadcast from rank 0 once at the start, as DDP does when it wraps a model.

With ``contrast_anchors`` (the default) the single-process loss contrasts each anchor with every
anchor of the batch, but the gathered loss keeps anchors local (as sentence-transformers does), which
would contrast it with its own rank's anchors only. :func:`global_anchor_block` restores the
single-process loss: the anchors, passed as one more candidate column, are gathered with the other
candidates, and the anchor-anchor block (student and guide similarities, the same false-negative
filter) is then scored against all W·b anchors; the loss's own anchor block is turned off.

Only rank 0 writes files (checkpoints, metrics, the final model, the guide cache, the default
data) and shows progress bars; the other ranks wait at a barrier and then read what it wrote, so
``--output`` and ``--cache-dir`` must be on a file system that all ranks see (one machine, or a
shared one).
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

# The guide cache is computed by rank 0 while the others wait at a barrier: that can take far longer
# than torch's default collective timeout (10-30 minutes).
DEFAULT_TIMEOUT_S = 6 * 3600
TIMEOUT_ENV = "GIST_FAST_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment names more than one process (``WORLD_SIZE`` > 1, as torchrun sets it)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> DistInfo:
    """The rank and world of the initialised process group (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def setup(device: str) -> tuple[DistInfo, str]:
    """Join the process group when launched by torchrun; returns the rank info and the device name.

    Without ``WORLD_SIZE`` > 1 in the environment nothing happens (``device`` is returned as given).
    Otherwise the process group is initialised unless it already is (NCCL when the device is CUDA,
    gloo on the CPU), and ``"auto"`` / ``"cuda"`` become ``cuda:LOCAL_RANK`` when CUDA is available.

    Raises:
        ValueError: an explicit ``cuda:N`` device under torchrun with several processes on a machine.
    """
    if not dist.is_available() or not (launched_by_torchrun() or dist.is_initialized()):
        return DistInfo(), device
    if "LOCAL_RANK" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
    else:  # a process group the caller initialised: keep the CUDA device it chose
        local_rank = torch.cuda.current_device() if torch.cuda.is_available() else 0
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if device.startswith("cuda:") and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise ValueError(
            f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda (or auto)"
        )
    if use_cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if backend == "nccl":
            kwargs["device_id"] = torch.device(device)
        dist.init_process_group(**kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank), device


def cleanup() -> None:
    """Leave the process group (when one is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with `code`. Under torchrun, leave the process group, flush and skip
    interpreter shutdown (``os._exit``): a rank has been seen to abort there ("terminate called
    without an active exception", a C++ thread of the distributed runtime destroyed while joinable)
    after its work was done and its files written, which torchrun reports as a failure."""
    if not launched_by_torchrun():
        sys.exit(code)
    cleanup()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _comm_device() -> torch.device:
    backend = str(dist.get_backend()).lower()
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def any_rank(info: DistInfo, flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (e.g. a Ctrl-C seen by one process)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(info: DistInfo, value: Tensor) -> Tensor:
    """The mean of a scalar over ranks (the logged loss: the mean of the per-rank means = the global mean)."""
    if not info.enabled:
        return value
    t = value.detach().to(_comm_device(), torch.float64).reshape(1).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / info.world).reshape(()).to(value.device, value.dtype)


def check_batch_size(info: DistInfo, batch_size: int) -> None:
    """Raise ValueError unless the global ``batch_size`` splits evenly over the processes."""
    if info.enabled and batch_size % info.world:
        raise ValueError(
            f"--batch-size {batch_size} is the global contrastive batch and must be divisible by the number of "
            f"processes ({info.world}); each process encodes batch_size / {info.world} rows"
        )


def shard_rows(info: DistInfo, rows: list[int]) -> list[int]:
    """This rank's slice of a global batch: ``rows[rank·b:(rank+1)·b]``, ``b = len(rows) // world``.

    A batch whose length is not a multiple of ``world`` (an epoch's short tail, or a batch that took
    in a one-row tail) loses its last ``len(rows) % world`` rows so that every rank holds the same
    number of rows (the gathered loss needs it). The trainer's batches have at least ``world`` rows
    (``NoDuplicatesBatches(min_rows=world)``); fewer would give an empty slice on every rank (the
    caller then skips the step).
    """
    if not info.enabled:
        return rows
    b = len(rows) // info.world
    return rows[info.rank * b : (info.rank + 1) * b]


@torch.no_grad()
def broadcast_parameters(info: DistInfo, module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (as DistributedDataParallel does at wrap time)."""
    if not info.enabled:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


@torch.no_grad()
def all_reduce_gradients(info: DistInfo, params: list[torch.nn.Parameter], bucket_bytes: int = 64 << 20) -> None:
    """Replace every parameter's ``.grad`` by its mean over ranks (sum, then divide by the world size).

    Gradients are flattened into buckets of one dtype (about ``bucket_bytes`` each) so the step makes
    a few large all-reduces, not one per tensor. A parameter that has a gradient on some rank but not
    on this one counts as zeros here; one without a gradient on every rank keeps ``.grad`` None.
    """
    if not info.enabled:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    grads = []
    for p, any_grad in zip(params, has.tolist(), strict=True):
        if not any_grad:
            continue  # no rank has a gradient: left None, as a single process would (AdamW skips it)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for group in by_dtype.values():
        bucket: list[Tensor] = []
        size = 0
        for g in [*group, None]:
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
            if bucket and (g is None or size >= bucket_bytes):
                flat = torch.cat([t.reshape(-1) for t in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                flat /= info.world
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()
                bucket, size = [], 0


def global_anchor_block(
    anchors: Tensor,
    guide_anchors: Tensor,
    negatives: list[Tensor] | None,
    guide_negatives: list[Tensor] | None,
    options: dict[str, Any],
) -> tuple[list[Tensor] | None, list[Tensor] | None, dict[str, Any]]:
    """Loss arguments that contrast every anchor with the anchors of all ranks (the global batch).

    When ``options`` gathers across devices with ``contrast_anchors`` and more than one process, the
    anchors (and the guide's anchors) become the first negative column and ``contrast_anchors`` is
    turned off: a negative column's block is scored and filtered exactly as the anchor-anchor block
    (``a·nᵀ`` masked where the guide's ``ga·gnᵀ`` exceeds the anchor's threshold, no exemption),
    and negative columns are gathered with gradient, so each rank's anchors are contrasted with all
    W·b anchors as in the single-process loss of the global batch. Otherwise returns its inputs.
    """
    from ..distributed import is_distributed

    if not (options.get("gather_across_devices") and options.get("contrast_anchors") and is_distributed()):
        return negatives, guide_negatives, options
    return (
        [anchors, *(negatives or [])],
        [guide_anchors, *(guide_negatives or [])],
        dict(options, contrast_anchors=False),
    )


__all__ = [
    "DistInfo",
    "all_reduce_gradients",
    "any_rank",
    "barrier",
    "broadcast_object",
    "broadcast_parameters",
    "check_batch_size",
    "cleanup",
    "exit_process",
    "current",
    "global_anchor_block",
    "launched_by_torchrun",
    "mean_over_ranks",
    "setup",
    "shard_rows",
]
