"""What both Triton plans share: the inputs laid out for the kernels (`_Problem`: padded widths,
row norms, thresholds and exact-tie codes, `_prepare`), and small launch helpers.

Feature dims are padded to a multiple of `ROW_ALIGN` (`_kernel_layout`) so the kernels load rows
with vector loads; norms and row dots are one `shared_kernels.row_dots_kernel` launch per input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from ...inputs import NORM_EPS, GISTOptions
from ..ties import guide_row_ids, masked_at_tie
from . import shared_kernels as SK


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _common_dtype(tensors: tuple[Tensor, ...]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _stack(tensors: tuple[Tensor, ...], like: Tensor) -> Tensor:
    """The k (P, d) tensors as one (k, P, d) tensor; a view when they already are one (as when
    `negatives` was passed as a (k, P, d) tensor), else a copy. k = 0 gives an empty tensor."""
    if not tensors:
        return like.new_empty((0, *like.shape))
    first = tensors[0]
    if len(tensors) == 1:
        return first.unsqueeze(0)
    step = tensors[1].data_ptr() - first.data_ptr()
    same_layout = all(
        t.stride() == first.stride() and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        for t in tensors
    )
    if same_layout and step % first.element_size() == 0 and step > 0:
        step_elems = step // first.element_size()
        if all(t.data_ptr() - first.data_ptr() == m * step for m, t in enumerate(tensors)):
            return first.as_strided((len(tensors), *first.shape), (step_elems, *first.stride()))
    return torch.stack(tensors)


def _row_dots(x: Tensor, y: Tensor) -> Tensor:
    """sum_k x[i, k] y[i, k] in fp32, one Triton program per 16 rows."""
    rows, dim = x.shape
    out = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows:
        block_r, block_k = 16, 64 if not interpreting() else 16
        SK.row_dots_kernel[(triton.cdiv(rows, block_r),)](
            x, y, out, rows, dim, x.stride(0), y.stride(0), BLOCK_R=block_r, BLOCK_K=block_k
        )
    return out


def _norms(tensors: list[Tensor]) -> Tensor:
    """|x_i| of every row of every tensor, concatenated (fp32; sqrt with IEEE rounding)."""
    return torch.cat([_row_dots(t, t) for t in tensors]).sqrt_()


@dataclass
class _Problem:
    """The inputs laid out for the kernels."""

    a: Tensor
    p: Tensor
    n: Tensor  # (k, P, d)
    ga: Tensor
    gp: Tensor
    gn: Tensor  # (k, P, dg)
    norms: Tensor  # (B + P + kP,) fp32
    gnorms: Tensor
    gids: Tensor  # (B + P + kP,) int32: the guide rows' ids (exact ties, `ties`)
    ties: Tensor  # (2B,) int32: tie codes 2 * tie id + decision, of the anchor-row blocks then PP
    thr: Tensor  # (B,) fp32
    options: GISTOptions

    @property
    def B(self) -> int:  # noqa: N802
        return self.a.shape[0]

    @property
    def P(self) -> int:  # noqa: N802
        return self.p.shape[0]

    @property
    def k(self) -> int:
        return self.n.shape[0]

    def shape_args(self) -> tuple:
        """Sizes, scalars and row strides, in the order both kernels take them (features are
        contiguous: `_kernel_layout`)."""
        o = self.options
        return (
            self.B,
            self.P,
            self.a.shape[1],
            self.ga.shape[1],
            o.offset,
            self.k,
            1.0 / o.temperature,
            self.a.stride(0),
            self.p.stride(0),
            *self.n.stride()[:2],
            self.ga.stride(0),
            self.gp.stride(0),
            *self.gn.stride()[:2],
        )


# Feature dims and row strides the kernels get are multiples of this many elements: Triton
# specialises an integer argument only on divisibility by 16, and only then can it load a row's
# features with 16-byte vectors and pipeline them (cp.async); benchmarks/NOTES.md, v2a and v3d.
ROW_ALIGN = 16


def padded_width(d: int) -> int:
    """d rounded up to a multiple of ROW_ALIGN: the feature width the kernels run at."""
    return -(-d // ROW_ALIGN) * ROW_ALIGN


def _kernel_layout(t: Tensor) -> Tensor:
    """`t` itself when its features are contiguous and its feature dim and other strides are
    multiples of ROW_ALIGN (every common embedding dim, stored contiguously), else a copy of width
    d rounded up to ROW_ALIGN, zero-filled past d (zeros change no dot and no norm).

    The kernels take the feature stride to be 1 (Triton does not specialise a runtime stride of 1,
    and with an unknown stride every load is a scalar one); an odd d (769, say) would also leave
    them scalar loads, through the row stride and the feature mask. The copy costs O(rows x d) once
    per call; the gradients come back at the padded width, and `_split` cuts them to d."""
    d = t.shape[-1]
    aligned = d % ROW_ALIGN == 0 and t.stride(-1) == 1
    if aligned and all(n <= 1 or s % ROW_ALIGN == 0 for n, s in zip(t.shape[:-1], t.stride()[:-1], strict=True)):
        return t
    padded = t.new_zeros((*t.shape[:-1], padded_width(d)))
    padded[..., :d] = t
    return padded


def _prepare(student: tuple[Tensor, ...], guide: tuple[Tensor, ...], options: GISTOptions) -> _Problem:
    s_dtype, g_dtype = _common_dtype(student), _common_dtype(guide)
    student = tuple(t.detach().to(s_dtype) for t in student)
    guide = tuple(t.detach().to(g_dtype) for t in guide)
    a, p, ga, gp = (_kernel_layout(t) for t in (student[0], student[1], guide[0], guide[1]))
    # The negatives stacked first (a view when they are one tensor already), then laid out once.
    n, gn = _kernel_layout(_stack(student[2:], p)), _kernel_layout(_stack(guide[2:], gp))
    B, o = a.shape[0], options.offset
    norms = _norms([a, p, *n.unbind(0)])
    gnorms = _norms([ga, gp, *gn.unbind(0)])
    # t_i = ga_hat_i . gp_hat_{o+i}, divided like the kernel divides the guide tiles.
    g_own = gnorms[B + o : 2 * B + o].clamp_min(NORM_EPS)
    t = _row_dots(ga, gp[o : o + B]) / (gnorms[:B].clamp_min(NORM_EPS) * g_own)
    gids, ties = _tie_codes(guide, t, options)
    return _Problem(a, p, n, ga, gp, gn, norms, gnorms, gids, ties, options.threshold(t), options)


# Tie codes 2 * id + decision must fit in int32.
MAX_GUIDE_ROWS = 2**30


def _tie_codes(guide: tuple[Tensor, ...], t: Tensor, options: GISTOptions) -> tuple[Tensor, Tensor]:
    """The guide rows' ids (B + P + kP, laid out like the norms) and the anchor rows' tie codes
    2 * tie id + [masked at a tie] (B for the anchor-row blocks: id of gp_{o+i}; B for PP: id of
    ga_i), int32, for the kernels' exact tie rule (`ties`)."""
    total = sum(g.shape[0] for g in guide)
    if total > MAX_GUIDE_ROWS:
        raise ValueError(f"the Triton backend takes at most {MAX_GUIDE_ROWS} guide rows in all; got {total}")
    ids = guide_row_ids(guide)
    B, o = t.shape[0], options.offset
    decision = masked_at_tie(t, options).to(torch.int64)
    codes = torch.cat([2 * ids[1][o : o + B] + decision, 2 * ids[0] + decision])
    return torch.cat(ids).to(torch.int32), codes.to(torch.int32)


def _kernel_flags(problem: _Problem) -> dict:
    dtype = problem.a.dtype
    upcast = interpreting() and (dtype == torch.bfloat16 or problem.ga.dtype == torch.bfloat16)
    return {"UPCAST": upcast, "PRECISION": "ieee"}

