"""Validated inputs and options of the GIST loss, shared by every backend.

`gist_loss` turns what the user passed into a `GISTInputs` and a `GISTOptions` here, once, so
that each backend receives tensors whose shapes, dtypes and devices already agree and never has to
check them again.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

MarginStrategy = Literal["absolute", "relative"]
Reduction = Literal["mean", "sum", "none"]

MARGIN_STRATEGIES = ("absolute", "relative")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Cosine similarity clamps every norm from below, as torch.nn.CosineSimilarity does (docs/loss.md).
NORM_EPS = 1e-8

# The smallest temperature accepted (docs/loss.md, "Precision and numerical range"). Logits reach
# 1/temperature, and the torch and cpp backends form the softmax exponent z - lse in float32 with
# round-off that grows like eps / tau. Worst gradient error in units of the gradient's scale
# (benchmarks/results/temperature_sweep_cpu.md): 3.5e-5 at 1e-4, 2.7e-4 at 1e-5, 0.45 at 1e-8, and
# NaN gradients with a finite loss from 1e-9 (torch) / 1e-10 (cpp). From 1e-4 up every backend stays
# within the tests' float32 tolerance; sentence-transformers' default is 0.01.
MIN_TEMPERATURE = 1e-4
# A row is refused when its squared norm exceeds this fraction of the compute dtype's largest value:
# the backends square and sum the row (and autograd squares the norm) in that dtype, and a fraction
# 1/4 leaves room for their rounding. float32: norms up to about 9.2e18.
SQUARED_NORM_HEADROOM = 0.25


@dataclass(frozen=True)
class GISTOptions:
    """The loss options, checked.

    Attributes:
        temperature: logits are cosine similarities divided by this (> 0, finite).
        margin_strategy: ``"absolute"``: ``thr = t - margin``; ``"relative"``: ``thr = t - |t| * margin``.
        margin: the margin of the false-negative filter.
        contrast_anchors: include the anchor-anchor block (AA).
        contrast_positives: include the positive-positive block (PP).
        reduction: ``"mean"`` over the local rows, ``"sum"``, or ``"none"`` (a B-vector).
        offset: column of anchor 0's positive among the P candidates (``rank * B`` when the
            candidates are gathered over processes, else 0).
        matryoshka_dims: None, or distinct prefix widths m in [1, d]: the loss is then
            ``sum_m w_m * L(student[..., :m]; the full guide)``, each L the GIST loss of the
            truncated student embeddings (cosine after truncation).
        matryoshka_weights: the w_m, one per entry of `matryoshka_dims` (None when it is None).
    """

    temperature: float = 0.01
    margin_strategy: MarginStrategy = "absolute"
    margin: float = 0.0
    contrast_anchors: bool = True
    contrast_positives: bool = True
    reduction: Reduction = "mean"
    offset: int = 0
    matryoshka_dims: tuple[int, ...] | None = None
    matryoshka_weights: tuple[float, ...] | None = None

    def threshold(self, target_guide_similarity: Tensor) -> Tensor:
        """`thr_i` from `t_i = ĝa_i · ĝp_{o+i}`; a candidate is masked when its guide similarity is > thr_i."""
        t = target_guide_similarity
        if self.margin_strategy == "absolute":
            return t - self.margin
        return t - t.abs() * self.margin


@dataclass(frozen=True)
class GISTInputs:
    """The embeddings, checked: same device, floating dtypes, consistent shapes.

    Attributes:
        anchor: (B, d) student anchors.
        positive: (P, d) student positives; ``P = B`` unless gathered.
        negatives: k tensors of shape (P, d), the student's negative columns.
        guide_anchor: (B, dg) guide anchors.
        guide_positive: (P, dg).
        guide_negatives: k tensors of shape (P, dg).
    """

    anchor: Tensor
    positive: Tensor
    negatives: tuple[Tensor, ...]
    guide_anchor: Tensor
    guide_positive: Tensor
    guide_negatives: tuple[Tensor, ...]

    @property
    def batch_size(self) -> int:
        return self.anchor.shape[0]

    @property
    def num_candidates(self) -> int:
        return self.positive.shape[0]

    @property
    def student_tensors(self) -> tuple[Tensor, ...]:
        return (self.anchor, self.positive, *self.negatives)

    @property
    def guide_tensors(self) -> tuple[Tensor, ...]:
        return (self.guide_anchor, self.guide_positive, *self.guide_negatives)

    def num_columns(self, options: GISTOptions) -> int:
        """N, the number of logit columns per row: AP, then AA, PP and the k AN blocks when present."""
        return (
            self.num_candidates
            + (self.batch_size if options.contrast_anchors else 0)
            + (self.num_candidates if options.contrast_positives else 0)
            + len(self.negatives) * self.num_candidates
        )


def _as_negative_tuple(name: str, value: Tensor | Sequence[Tensor] | None) -> tuple[Tensor, ...]:
    """Accept None, one (P, d) tensor, a (k, P, d) tensor, or a sequence of (P, d) tensors."""
    if value is None:
        return ()
    if isinstance(value, Tensor):
        if value.dim() == 2:
            return (value,)
        if value.dim() == 3:
            return tuple(value.unbind(0))
        raise ValueError(
            f"{name} must be a (rows, dim) tensor, a (k, rows, dim) tensor or a sequence of (rows, dim) "
            f"tensors; got a tensor of shape {tuple(value.shape)}"
        )
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be None, a tensor or a sequence of tensors; got {type(value).__name__}")
    for m, item in enumerate(value):
        if not isinstance(item, Tensor):
            raise TypeError(f"{name}[{m}] must be a torch.Tensor; got {type(item).__name__}")
    return tuple(value)


def _check_group(kind: str, named: list[tuple[str, Tensor]], rows_of_positive: int | None) -> int:
    """Check dtype and 2-D shapes of one model's tensors; return their common feature dim."""
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64); got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, dim); got shape {tuple(t.shape)}")
    anchor_name, anchor = named[0]
    dim = anchor.shape[1]
    if anchor.shape[0] == 0:
        raise ValueError(f"{anchor_name} is an empty batch (0 rows)")
    if dim == 0:
        raise ValueError(f"{anchor_name} has embedding dimension 0")
    for name, t in named[1:]:
        if t.shape[1] != dim:
            raise ValueError(
                f"{name} has dimension {t.shape[1]} but {anchor_name} has {dim}: all {kind} embeddings "
                "must share one dimension"
            )
    positive_name, positive = named[1]
    if rows_of_positive is not None and positive.shape[0] != rows_of_positive:
        raise ValueError(f"{positive_name} has {positive.shape[0]} rows but {anchor_name} has {rows_of_positive}")
    for name, t in named[2:]:
        if t.shape[0] != positive.shape[0]:
            raise ValueError(f"{name} has {t.shape[0]} rows but {positive_name} has {positive.shape[0]}")
    return dim


def compute_dtype_of(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype the backends compute in: float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_values(named: list[tuple[str, Tensor]], dtype: torch.dtype) -> None:
    """No NaN or Inf, and no row whose squared L2 norm overflows `dtype` (the norms would come out
    Inf, the row's cosines 0: a wrong finite loss with zero gradient). One max-reduction per tensor;
    rows are only summed when the largest entry says a row could be too long."""
    limit = torch.finfo(dtype).max * SQUARED_NORM_HEADROOM
    for name, t in named:
        peak = float(t.detach().abs().amax())  # NaN propagates through amax
        if not math.isfinite(peak):
            raise ValueError(f"{name} contains NaN or Inf")
        if peak * peak * t.shape[1] <= limit:
            continue
        for start in range(0, t.shape[0], 4096):
            rows = t.detach()[start : start + 4096].to(torch.float64)
            row_peak = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
            norms = (rows / row_peak).norm(dim=1) * row_peak.squeeze(1)  # scaled: no overflow here
            too_long = (norms * norms > limit).nonzero()
            if too_long.numel():
                row = start + int(too_long[0])
                raise ValueError(
                    f"{name} row {row} has L2 norm {float(norms[row - start]):.3g}, whose square overflows "
                    f"the {str(dtype).removeprefix('torch.')} computation (norms up to "
                    f"{math.sqrt(limit):.3g} are accepted); cosine similarity ignores the scale, so divide "
                    "the embeddings by a constant"
                )


def check_matryoshka(
    dims: Sequence[int] | None, weights: Sequence[float] | None, student_dim: int
) -> tuple[tuple[int, ...] | None, tuple[float, ...] | None]:
    """`matryoshka_dims` and `matryoshka_weights` as tuples (weights default to 1), or (None, None).

    Dims must be distinct ints in [1, student_dim]; weights finite numbers, one per dim. Raises a
    ValueError / TypeError naming the argument.
    """
    if dims is None:
        if weights is not None:
            raise ValueError("matryoshka_weights was given without matryoshka_dims")
        return None, None
    if isinstance(dims, (str, bytes, Tensor)) or not isinstance(dims, Sequence):
        raise TypeError(f"matryoshka_dims must be a sequence of ints; got {type(dims).__name__}")
    if len(dims) == 0:
        raise ValueError("matryoshka_dims must hold at least one dimension; got an empty sequence")
    as_ints = []
    for m in dims:
        if isinstance(m, bool) or not isinstance(m, numbers.Integral):
            raise TypeError(f"matryoshka_dims must hold ints; got {m!r} ({type(m).__name__})")
        if not 1 <= m <= student_dim:
            raise ValueError(f"matryoshka_dims entries must lie in [1, {student_dim}] (the student's dim); got {m}")
        as_ints.append(int(m))
    if len(set(as_ints)) != len(as_ints):
        raise ValueError(f"matryoshka_dims must be distinct; got {tuple(as_ints)}")
    if weights is None:
        return tuple(as_ints), (1.0,) * len(as_ints)
    if isinstance(weights, (str, bytes, Tensor)) or not isinstance(weights, Sequence):
        raise TypeError(f"matryoshka_weights must be a sequence of numbers; got {type(weights).__name__}")
    if len(weights) != len(dims):
        raise ValueError(
            f"matryoshka_weights has {len(weights)} entries but matryoshka_dims has {len(dims)}: one weight per dim"
        )
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"matryoshka_weights must hold finite numbers; got {w!r}")
    return tuple(as_ints), tuple(float(w) for w in weights)


def validate(
    anchor: Tensor,
    positive: Tensor,
    guide_anchor: Tensor,
    guide_positive: Tensor,
    negatives: Tensor | Sequence[Tensor] | None,
    guide_negatives: Tensor | Sequence[Tensor] | None,
    *,
    temperature: float,
    margin_strategy: str,
    margin: float,
    contrast_anchors: bool,
    contrast_positives: bool,
    reduction: str,
    offset: int = 0,
    expected_candidates: int | None = None,
    check_finite: bool = True,
    matryoshka_dims: Sequence[int] | None = None,
    matryoshka_weights: Sequence[float] | None = None,
) -> tuple[GISTInputs, GISTOptions]:
    """Check everything `gist_loss` was given; raise a ValueError/TypeError naming the argument.

    `expected_candidates` is P when the positives were gathered (P = world_size * B); by default
    P must equal B. `check_finite=False` skips the value checks (NaN/Inf, norms whose square
    overflows), which read every input once.
    """
    negs = _as_negative_tuple("negatives", negatives)
    guide_negs = _as_negative_tuple("guide_negatives", guide_negatives)
    if len(negs) != len(guide_negs):
        raise ValueError(
            f"negatives has {len(negs)} column(s) but guide_negatives has {len(guide_negs)}: "
            "the guide must embed every negative column the student does"
        )
    student = [("anchor", anchor), ("positive", positive)] + [(f"negatives[{m}]", t) for m, t in enumerate(negs)]
    guide = [("guide_anchor", guide_anchor), ("guide_positive", guide_positive)] + [
        (f"guide_negatives[{m}]", t) for m, t in enumerate(guide_negs)
    ]
    rows = anchor.shape[0] if expected_candidates is None and isinstance(anchor, Tensor) else expected_candidates
    _check_group("student", student, rows)
    _check_group("guide", guide, rows)
    if guide_anchor.shape[0] != anchor.shape[0]:
        raise ValueError(f"guide_anchor has {guide_anchor.shape[0]} rows but anchor has {anchor.shape[0]}")
    if guide_positive.shape[0] != positive.shape[0]:
        raise ValueError(f"guide_positive has {guide_positive.shape[0]} rows but positive has {positive.shape[0]}")
    device = anchor.device
    for name, t in student[1:] + guide:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but anchor is on {device}: move all inputs to one device")

    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number; got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0; got {temperature}")
    if temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE:g}; got {temperature:g}: below it the logits (up to "
            "1/temperature) are too large for float32 round-off and the gradients go wrong, then NaN "
            "(see docs/loss.md, 'Numerical range')"
        )
    if margin_strategy not in MARGIN_STRATEGIES:
        raise ValueError(f"margin_strategy must be one of {MARGIN_STRATEGIES}; got {margin_strategy!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number; got {margin!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    for name, flag in (("contrast_anchors", contrast_anchors), ("contrast_positives", contrast_positives)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
    batch = anchor.shape[0]
    if not 0 <= offset <= positive.shape[0] - batch:
        raise ValueError(
            f"offset {offset} puts the targets outside the {positive.shape[0]} candidates for {batch} anchors"
        )
    dims, weights = check_matryoshka(matryoshka_dims, matryoshka_weights, anchor.shape[1])
    if check_finite:
        _check_values(student + guide, compute_dtype_of([t for _, t in student + guide]))

    inputs = GISTInputs(anchor, positive, negs, guide_anchor, guide_positive, guide_negs)
    options = GISTOptions(
        temperature=float(temperature),
        margin_strategy=margin_strategy,  # type: ignore[arg-type]
        margin=float(margin),
        contrast_anchors=contrast_anchors,
        contrast_positives=contrast_positives,
        reduction=reduction,  # type: ignore[arg-type]
        offset=int(offset),
        matryoshka_dims=dims,
        matryoshka_weights=weights,
    )
    return inputs, options
