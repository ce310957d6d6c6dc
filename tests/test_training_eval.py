"""Retrieval metrics against hand-computed values."""

import math

import pytest
import torch

from gist_fast.training.evaluation import retrieval_metrics


def test_metrics_by_hand():
    # corpus: 12 unit vectors; query 0 ranks its document first, query 1 third, query 2 at rank 12
    corpus = torch.eye(12)
    q = torch.zeros(3, 12)
    q[0] = torch.linspace(1, 0, 12)  # scores decrease with the index: doc 0 first
    q[1] = torch.linspace(1, 0, 12)  # relevant doc 2 -> rank 3
    q[2] = torch.linspace(1, 0, 12)  # relevant doc 11 -> rank 12 (outside the top 10)
    m = retrieval_metrics(q, corpus, [{0}, {2}, {11}], chunk_size=2)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@10"] == pytest.approx(2 / 3)
    assert m["recall@100"] == pytest.approx(1.0)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 0) / 3)
    assert (m["queries"], m["corpus"]) == (3, 12)


def test_two_relevant_documents():
    corpus = torch.eye(4)
    q = torch.tensor([[1.0, 0.9, 0.1, 0.0]])
    m = retrieval_metrics(q, corpus, [{1, 3}])
    # ranks: doc0, doc1 (hit at 2), doc2, doc3 (hit at 4)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx(dcg / idcg)
    assert m["mrr@10"] == pytest.approx(0.5)
    assert m["recall@1"] == 0 and m["recall@10"] == 1
