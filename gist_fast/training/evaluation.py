"""Retrieval evaluation: queries are the anchors, the corpus is the distinct positives, exact search."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .data import PairData
from .encoders import Encoder

METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100")


def retrieval_metrics(queries: Tensor, corpus: Tensor, relevant: list[set[int]], *, chunk_size: int = 1024) -> dict:
    """Exact cosine search of ``queries`` over ``corpus`` in chunks of queries; binary relevance.

    Args:
        queries: (q, d) query embeddings.
        corpus: (c, d) document embeddings.
        relevant: for each query, the set of relevant corpus rows (non-empty).
        chunk_size: queries scored per matmul (memory ``chunk_size * c``).

    Returns:
        ``{"ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100"}`` as floats in [0, 1], plus
        ``"queries"`` and ``"corpus"`` (counts). Recall@k is the fraction of a query's relevant
        documents among its top k, averaged over queries.

    Example:
        >>> q = torch.eye(2); c = torch.eye(2)
        >>> retrieval_metrics(q, c, [{0}, {1}])["ndcg@10"]
        1.0
    """
    if queries.shape[0] != len(relevant):
        raise ValueError(f"{queries.shape[0]} queries but {len(relevant)} relevance sets")
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    c = torch.nn.functional.normalize(corpus.float(), dim=-1)
    k = min(100, c.shape[0])
    discounts = 1.0 / torch.log2(torch.arange(2, 12, dtype=torch.float64))
    sums = dict.fromkeys(METRICS, 0.0)
    for start in range(0, q.shape[0], chunk_size):
        top = (q[start : start + chunk_size] @ c.T).topk(k, dim=1).indices.tolist()
        for row, ranked in enumerate(top):
            rel = relevant[start + row]
            hits = [doc in rel for doc in ranked]
            dcg = sum(float(discounts[r]) for r in range(min(10, k)) if hits[r])
            idcg = float(discounts[: min(10, len(rel))].sum())
            sums["ndcg@10"] += dcg / idcg
            first = next((r for r in range(min(10, k)) if hits[r]), None)
            sums["mrr@10"] += 0.0 if first is None else 1.0 / (first + 1)
            for cut in (1, 10, 100):
                sums[f"recall@{cut}"] += sum(hits[:cut]) / len(rel)
    n = q.shape[0]
    out = {m: sums[m] / n for m in METRICS}
    out.update(queries=n, corpus=c.shape[0])
    return out


def metrics_by_dim(queries: Tensor, corpus: Tensor, relevant: list[set[int]], dims: Sequence[int]) -> dict:
    """Retrieval metrics of the embeddings truncated to each size m in ``dims`` (Matryoshka).

    Each size keeps the first m features of every query and document, then scores as
    :func:`retrieval_metrics` does (cosine: normalised after truncation, as sentence-transformers'
    ``truncate_dim`` does).

    Args:
        queries: (q, d) query embeddings. corpus: (c, d) document embeddings.
        relevant: for each query, its relevant corpus rows.
        dims: sizes m in [1, d].

    Returns:
        ``{"m": {"ndcg@10": ..., "mrr@10": ..., "recall@1": ..., ...}}``, keyed by the size as a
        string (JSON keys), in the order of ``dims``.

    Raises:
        ValueError when a size is not in [1, d].

    Example:
        >>> q = torch.tensor([[1.0, 1.0], [1.0, -1.0]])  # the same first feature: one size is too few
        >>> by_dim = metrics_by_dim(q, q, [{0}, {1}], [2, 1])
        >>> by_dim["2"]["recall@1"], by_dim["1"]["recall@1"]
        (1.0, 0.5)
    """
    _check_sizes(dims, queries.shape[1])
    out = {}
    for m in dims:
        scored = retrieval_metrics(queries[:, :m], corpus[:, :m], relevant)
        out[str(m)] = {name: scored[name] for name in METRICS}
    return out


def _check_sizes(dims: Sequence[int], width: int) -> None:
    bad = [m for m in dims if not 1 <= m <= width]
    if bad:
        raise ValueError(f"Matryoshka sizes must lie in [1, {width}] (the embedding dim); got {bad}")


def evaluate(
    encoder: Encoder,
    data: PairData,
    *,
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    dims: Sequence[int] | None = None,
    truncate_dim: int | None = None,
) -> dict:
    """Embed held-out pairs with ``encoder`` and score retrieval (see :func:`retrieval_metrics`).

    Queries are the distinct anchors; the corpus is the distinct positives; an anchor's relevant
    documents are all positives it is paired with.

    Args:
        encoder: the model. data: the pairs. batch_size: texts per forward pass.
        dtype: autocast dtype (None: the weights'). progress: tqdm bars.
        dims: Matryoshka sizes: the result also holds ``"dims"``, the metrics of the embeddings
            truncated to each size (see :func:`metrics_by_dim`).
        truncate_dim: score the embeddings truncated to their first ``truncate_dim`` features
            (the top-level metrics are then at that size, and ``"truncate_dim"`` says so; ``dims``
            still truncate the full embeddings).

    Raises:
        ValueError when a size exceeds the embedding dim (or ``truncate_dim`` does).

    Example:
        >>> evaluate(student, load_pairs("eval.jsonl"))["ndcg@10"]  # doctest: +SKIP
        0.61
        >>> evaluate(student, load_pairs("eval.jsonl"), dims=[384, 64])["dims"]["64"]["ndcg@10"]  # doctest: +SKIP
        0.52
    """
    if truncate_dim is not None and not 1 <= truncate_dim <= encoder.dim:
        raise ValueError(f"truncate_dim must lie in [1, {encoder.dim}] (the embedding dim); got {truncate_dim}")
    if dims is not None:
        _check_sizes(dims, encoder.dim)  # before the encoding
    anchors = list(dict.fromkeys(data.anchors))
    docs = list(dict.fromkeys(data.positives))
    a_pos = {t: i for i, t in enumerate(anchors)}
    d_pos = {t: i for i, t in enumerate(docs)}
    relevant: list[set[int]] = [set() for _ in anchors]
    for a, p in zip(data.anchors, data.positives, strict=True):
        relevant[a_pos[a]].add(d_pos[p])
    q = encoder.encode(anchors, batch_size=batch_size, dtype=dtype, progress="eval queries" if progress else False)
    c = encoder.encode(docs, batch_size=batch_size, dtype=dtype, progress="eval corpus" if progress else False)
    if truncate_dim is None:
        out = retrieval_metrics(q, c, relevant)
    else:
        out = retrieval_metrics(q[:, :truncate_dim], c[:, :truncate_dim], relevant)
        out["truncate_dim"] = truncate_dim
    if dims is not None:
        out["dims"] = metrics_by_dim(q, c, relevant, dims)
    return out


def format_metrics(metrics: dict) -> str:
    """One line: ``ndcg@10 0.512 | mrr@10 0.470 | ...``."""
    parts = [f"{m} {metrics[m]:.4f}" for m in METRICS if m in metrics and not math.isnan(metrics[m])]
    return " | ".join(parts)


def format_dim_metrics(metrics: dict) -> list[str]:
    """One line per Matryoshka size of ``metrics["dims"]`` (none without it): ``dim 64: ndcg@10 0.48 | ...``."""
    return [f"dim {m}: {format_metrics(per)}" for m, per in metrics.get("dims", {}).items()]
