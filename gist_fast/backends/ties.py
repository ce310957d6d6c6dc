"""Exact ties of the guide's mask: one integer id per guide row, equal exactly for bitwise-equal rows.

A candidate is masked when its guide similarity exceeds the row's threshold ``thr_i``, which is set
by the guide's anchor-positive similarity ``t_i``. When the pair of guide rows behind a logit is
bitwise the pair that defines ``t_i`` (up to order), the two similarities are equal in exact
arithmetic, but each backend rounds them differently, so float comparison would decide the tie by
round-off. Every backend instead compares ids and decides such a tie symbolically:

- anchor-row blocks (AP, AA, AN_m): the logit's guide pair is (ga_i, c_j); it is the threshold
  pair exactly when ``id(c_j) == id(gp_{o+i})``;
- the PP block: the pair is (gp_{o+i}, c_j); it is the threshold pair exactly when
  ``id(c_j) == id(ga_i)``;
- at a tie the similarity equals ``t_i``, so the candidate is masked exactly when
  ``t_i > thr_i``: ``margin > 0`` (absolute) or ``|t_i| * margin > 0`` (relative; ``t_i != 0``
  and ``margin > 0``, decided without forming the product, which could underflow).

The positive itself (AP column o + i) stays never masked. Ids come from a 64-bit hash of each
row's bits (computed on the rows' device, a chunk of rows at a time, so memory beyond the ids is
bounded), then every row is compared bytewise with the first row of its hash group, so a hash
collision can never merge different rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs import GISTInputs, GISTOptions

# The bits of a float dtype as the signed integer type of the same width.
_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}

# A chunk of rows holds at most this many 32-bit words in the hashing temporaries.
_CHUNK_ELEMENTS = {"cuda": 1 << 24}
_DEFAULT_CHUNK_ELEMENTS = 1 << 20

_HASH_SEED = 0x6A09E667F3BCC908  # fixed: ids need not be reproducible, but runs should be


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _chunk_rows(t: Tensor) -> int:
    per_chunk = _CHUNK_ELEMENTS.get(t.device.type, _DEFAULT_CHUNK_ELEMENTS)
    return max(1, per_chunk // max(1, t.shape[1]))


def _words(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The rows of `x`, cast to `dtype` (exact: a promotion), as int32 words: rows with equal words
    are bitwise equal. Casting to the common dtype makes rows of different input dtypes comparable;
    it is injective, so -0.0 and 0.0 stay apart."""
    x = x.to(dtype).contiguous()
    if (x.shape[1] * x.element_size()) % 4 == 0:
        return x.view(torch.int32)  # 16-bit features in pairs, 64-bit ones in halves
    return x.view(_BITS[dtype]).to(torch.int32)


def _words_per_row(dim: int, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return dim * size // 4 if (dim * size) % 4 == 0 else dim


def _hash_weights(words: int, rows: int, device: torch.device) -> Tensor:
    """(2, 2, rows, words) odd random int32 multipliers, the same for every row: two independent
    hashes of two multipliers each. On the CPU they are laid out for a whole chunk of `rows` rows
    (torch's CPU integer kernels are ~30x slower when one operand is broadcast); elsewhere one row
    is broadcast (rows = 1)."""
    gen = torch.Generator().manual_seed(_HASH_SEED)
    w = torch.randint(-(2**30), 2**30, (2, 2, 1, words), generator=gen, dtype=torch.int32) * 2 + 1
    w = w.to(device)
    return w.expand(2, 2, rows, words).contiguous() if device.type == "cpu" else w


def row_hashes(words: Tensor, weights: Tensor) -> Tensor:
    """A 64-bit hash (int64) of each row of int32 `words` (rows x n): two independent 32-bit hashes
    sum_k mix(words_k * w1_k) * w2_k with mix(h) = h xor (h >> 16), all wrapping modulo 2^32.
    Integer sums wrap the same in any order, so equal rows hash alike on any device and in any
    chunk; 32-bit integer arithmetic vectorises where 64-bit multiplication does not."""
    halves = []
    n = words.shape[0]
    for w1, w2 in weights:
        h = words * w1[:n]
        h ^= h >> 16
        h *= w2[:n]
        halves.append(h.sum(dim=1, dtype=torch.int32).to(torch.int64))
    return (halves[0] << 32) | (halves[1] & 0xFFFFFFFF)


def guide_row_ids(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Integer ids of the rows of `tensors`, jointly: two rows get one id exactly when they are
    bitwise equal (after casting every tensor to their common dtype, which is exact).

    Args:
        tensors: 2-D tensors on one device with one feature dim (the guide's anchors, positives and
            negative columns).

    Returns:
        One int64 vector per tensor: the id of each row, in [0, total rows). The id of a row is the
        position (in the concatenation of `tensors`) of the first row equal to it.

    Example:
        >>> x = torch.tensor([[1.0, 2.0], [0.0, -0.0]])
        >>> y = torch.tensor([[0.0, -0.0], [0.0, 0.0]])
        >>> [ids.tolist() for ids in guide_row_ids([x, y])]
        [[0, 1], [1, 3]]
    """
    dtype = _common_dtype(tensors)
    device = tensors[0].device
    sizes = [t.shape[0] for t in tensors]
    starts = [sum(sizes[:m]) for m in range(len(sizes))]
    total = sum(sizes)
    weights = _hash_weights(
        _words_per_row(tensors[0].shape[1], dtype), min(max(sizes), _chunk_rows(tensors[0])), device
    )

    hashes = torch.empty(total, dtype=torch.int64, device=device)
    for t, start in zip(tensors, starts, strict=True):
        step = _chunk_rows(t)
        for r0 in range(0, t.shape[0], step):
            r1 = min(r0 + step, t.shape[0])
            hashes[start + r0 : start + r1] = row_hashes(_words(t[r0:r1], dtype), weights)

    # Group equal hashes; the representative of a group is its first row (a stable sort keeps the
    # rows of a group in index order).
    order = torch.argsort(hashes, stable=True)
    sorted_hashes = hashes[order]
    first = torch.ones(total, dtype=torch.bool, device=device)
    first[1:] = sorted_hashes[1:] != sorted_hashes[:-1]
    positions = torch.arange(total, device=device)
    group_start = torch.where(first, positions, torch.zeros_like(positions)).cummax(dim=0).values
    ids = torch.empty_like(order)
    ids[order] = order[group_start]
    del order, sorted_hashes, first, positions, group_start

    # Verify bytewise: every row against its representative.
    collided = torch.zeros(total, dtype=torch.bool, device=device)
    for t, start in zip(tensors, starts, strict=True):
        step = _chunk_rows(t)
        for r0 in range(0, t.shape[0], step):
            r1 = min(r0 + step, t.shape[0])
            rep_words = _gather_words(tensors, starts, ids[start + r0 : start + r1], dtype)
            collided[start + r0 : start + r1] = (_words(t[r0:r1], dtype) != rep_words).any(dim=1)
    if bool(collided.any()):
        _resolve_collisions(tensors, starts, ids, collided, dtype)
    return [ids[start : start + size] for start, size in zip(starts, sizes, strict=True)]


def _gather_words(tensors: Sequence[Tensor], starts: Sequence[int], index: Tensor, dtype: torch.dtype) -> Tensor:
    """The words of rows `index` of the concatenation of `tensors` (without concatenating them)."""
    words = _words_per_row(tensors[0].shape[1], dtype)
    out = torch.empty((index.shape[0], words), dtype=torch.int32, device=index.device)
    for t, start in zip(tensors, starts, strict=True):
        inside = (index >= start) & (index < start + t.shape[0])
        where = inside.nonzero().squeeze(1)
        if where.numel():
            out[where] = _words(t[index[where] - start], dtype)
    return out


def _resolve_collisions(
    tensors: Sequence[Tensor], starts: Sequence[int], ids: Tensor, collided: Tensor, dtype: torch.dtype
) -> None:
    """Rare (a hash collision): every row of a hash group that holds a mismatch gets the id of the
    first row bitwise equal to it, by an exact sort of those rows' words. In place on `ids`."""
    groups = torch.unique(ids[collided])
    members = torch.isin(ids, groups).nonzero().squeeze(1)  # in index order
    rows = _gather_words(tensors, starts, members, dtype)
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), ids.shape[0], dtype=ids.dtype, device=ids.device)
    first.scatter_reduce_(0, inverse, members, reduce="amin")
    ids[members] = first[inverse]


@dataclass(frozen=True)
class TieIds:
    """What a backend needs to decide exact ties.

    Attributes:
        columns: the id of every guide row, per input: anchors (B,), positives (P,), then each
            negative column (P,); int32 (int64 beyond 2^30 rows).
        anchor_rows: (B,) the tie id of anchor row i in the anchor-row blocks (AP, AA, AN_m):
            ``id(gp_{o+i})``.
        positive_rows: (B,) the tie id of PP row i: ``id(ga_i)``.
    """

    columns: tuple[Tensor, ...]
    anchor_rows: Tensor
    positive_rows: Tensor

    def row_ids(self, pp: bool) -> Tensor:
        """The rows' tie ids for the PP block (`pp`) or the anchor-row blocks."""
        return self.positive_rows if pp else self.anchor_rows


def tie_ids(inputs: GISTInputs, options: GISTOptions) -> TieIds:
    """The ids of the guide rows of `inputs` and the rows' tie ids (see the module docstring)."""
    ids = guide_row_ids(inputs.guide_tensors)
    dtype = torch.int32 if sum(i.numel() for i in ids) < 2**30 else torch.int64
    ids = tuple(i.to(dtype) for i in ids)
    B, o = inputs.batch_size, options.offset
    return TieIds(columns=ids, anchor_rows=ids[1][o : o + B], positive_rows=ids[0])


def masked_at_tie(target_similarity: Tensor, options: GISTOptions) -> Tensor:
    """(B,) bool: whether a candidate tying with row i's threshold pair is masked, decided exactly:
    its similarity equals t_i, and t_i > thr_i holds exactly when margin > 0 (absolute) or
    |t_i| * margin > 0 (relative)."""
    t = target_similarity
    if options.margin <= 0:
        return torch.zeros(t.shape, dtype=torch.bool, device=t.device)
    if options.margin_strategy == "absolute":
        return torch.ones(t.shape, dtype=torch.bool, device=t.device)
    return t != 0


def guide_mask(guide: Tensor, threshold: Tensor, row_tie: Tensor, col_ids: Tensor, tie_masked: Tensor) -> Tensor:
    """The guide's mask of a (rows x columns) tile: ``guide > thr_i``, except where the column's id
    is the row's tie id, where the exact decision `tie_masked` (per row) applies."""
    tie = col_ids[None, :] == row_tie[:, None]
    return torch.where(tie, tie_masked[:, None], guide > threshold[:, None])
