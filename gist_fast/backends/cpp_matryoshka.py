"""The C++ backend's Matryoshka path: every prefix dim of the student in one sweep of the native kernel.

``sum_k w_k L_k``, L_k the GIST loss of the student embeddings cut to their first m_k features
(cosine after truncation) against the full guide, by the two passes of ``csrc/gist_cpu.cpp``
(``forward_matryoshka`` / ``backward_matryoshka``) with what the dims share computed once per tile:
the guide dots and mask (exact ties decided by guide row ids, as in the plain kernel), and the raw
student dots of every prefix, summed feature segment by segment up to the largest dim. Each dim
keeps its own prefix norms, online logsumexp, target logit, row-side means and gradient products
(torch_matryoshka.py is the same plan in torch). Memory is linear in B: per dim B x m_k row-side
means (twice with PP) and per student input n x m_k column-side gradients.

The autograd glue is cpp_backend.py's: for ``reduction="mean"``/``"sum"`` the forward call computes
loss and gradients, for ``"none"`` pass 2 runs in backward with the per-row incoming weights; half
inputs are upcast to float32 and the gradients returned in each input's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..inputs import GISTInputs, GISTOptions
from .common import reduce, refuse_double_backward, row_weight
from .cpp_backend import _compute_dtype, _option_args, load_extension
from .ties import guide_row_ids


class _MatryoshkaCppFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, options: GISTOptions, num_negatives: int, tiles: tuple[int, int], keep_mask: bool, *tensors):
        ext = load_extension()
        k = num_negatives
        dtype = _compute_dtype(tensors)
        cast = [t.detach().to(dtype) for t in tensors]
        student, guide = cast[: 2 + k], cast[2 + k :]
        ids = [i.to(torch.int32) for i in guide_row_ids(tensors[2 + k :])]
        pairs = sorted(zip(options.matryoshka_dims, options.matryoshka_weights, strict=True))
        dims, weights = [m for m, _ in pairs], [float(w) for _, w in pairs]
        args = _option_args(options, tiles)
        needs_grad = any(ctx.needs_input_grad[4 : 6 + k])
        losses, lse, threshold, tie_masked, mask, *means = ext.forward_matryoshka(
            student, guide, ids, dims, *args, keep_mask and needs_grad
        )
        K = len(dims)
        e_a, e_p = means[:K], means[K:]
        # (K, B) per-dim row losses, weighted and summed per row.
        per_row = (losses * torch.tensor(weights, dtype=dtype)[:, None]).sum(0)
        loss = reduce(per_row, options.reduction)

        ctx.options, ctx.k, ctx.tiles, ctx.dims, ctx.weights = options, k, tiles, dims, weights
        ctx.dtypes = [t.dtype for t in tensors[: 2 + k]]
        if not needs_grad:
            return loss
        if options.reduction == "none":
            # Per-row incoming weights are unknown until backward: keep what pass 2 needs.
            ctx.save_for_backward(lse, threshold, tie_masked, mask, *ids, *cast, *e_a, *e_p)
            ctx.deferred = True
        else:
            row_weights = torch.full((losses.shape[1],), row_weight(options, losses.shape[1]), dtype=dtype)
            grads = ext.backward_matryoshka(
                student, guide, ids, dims, weights, lse, threshold, tie_masked, e_a, e_p, row_weights, *args, True,
                mask,
            )  # fmt: skip
            del e_a, e_p, mask
            ctx.save_for_backward(*[g.to(t) for g, t in zip(grads, ctx.dtypes, strict=True)])
            ctx.deferred = False
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        refuse_double_backward()
        k = ctx.k
        n_student = 2 + k
        if not any(ctx.needs_input_grad[4 : 6 + k]):
            return (None,) * (4 + 2 * n_student)
        if ctx.deferred:
            lse, threshold, tie_masked, mask, *saved = ctx.saved_tensors
            K = len(ctx.dims)
            ids, cast = saved[:n_student], saved[n_student : 3 * n_student]
            e_a, e_p = saved[3 * n_student : 3 * n_student + K], saved[3 * n_student + K :]
            weight = grad_out.detach().to(lse.dtype).contiguous()
            # consume=False: saved tensors stay intact (retain_graph may call backward again).
            grads = load_extension().backward_matryoshka(
                cast[:n_student], cast[n_student:], ids, ctx.dims, ctx.weights, lse, threshold, tie_masked, e_a, e_p,
                weight, *_option_args(ctx.options, ctx.tiles), False, mask,
            )  # fmt: skip
            grads = [g.to(t) for g, t in zip(grads, ctx.dtypes, strict=True)]
        else:
            grads = list(ctx.saved_tensors)
            if not bool((grad_out == 1).all()):
                grads = [g * grad_out.to(g.dtype) for g in grads]
        student = [g if ctx.needs_input_grad[4 + i] else None for i, g in enumerate(grads)]
        return (None, None, None, None, *student, *([None] * n_student))


def gist_loss_cpp_matryoshka(
    inputs: GISTInputs, options: GISTOptions, *, tile_rows: int, tile_cols: int, keep_mask: bool
) -> Tensor:
    """``sum_k w_k L(student[..., :m_k])`` for ``options.matryoshka_dims`` by the native kernel, all
    dims in one two-pass sweep (see the module docstring); `keep_mask`: pass 1 keeps the guide mask
    as bits for pass 2. Memory linear in B."""
    return _MatryoshkaCppFunction.apply(
        options,
        len(inputs.negatives),
        (tile_rows, tile_cols),
        keep_mask,
        *inputs.student_tensors,
        *inputs.guide_tensors,
    )
