"""Tokens: batches padded exactly as a row-by-row loop pads them (right and left), each text tokenized
once per training run (the token cache), the same gradients with the cache as without."""

from __future__ import annotations

import json

import pytest
import torch
from problems import SESSION_SEED

import gist_fast.training.tokens as tokens_mod
from gist_fast.training import TrainConfig, Trainer
from gist_fast.training.gradcache import gradcache_step
from gist_fast.training.testing import make_tiny_encoder
from gist_fast.training.tokens import TokenCache, TokenizedPool, tokenize_pool

WORDS = ["value", "file", "path", "list", "dict", "string", "error", "module", "class", "data", "time", "name"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _texts(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(1, 12, (1,), generator=g))
        out.append(" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=g)) + f" {i}")
    return out


def _loop_padded(rows, width, pad, side):
    out = torch.full((len(rows), width), pad, dtype=torch.int64)
    for r, row in enumerate(rows):
        if side == "left":
            out[r, width - len(row) :] = torch.tensor(row)
        else:
            out[r, : len(row)] = torch.tensor(row)
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_features_pad_as_a_row_by_row_loop(side):
    g = torch.Generator().manual_seed(SESSION_SEED)
    lengths = torch.randint(1, 20, (23,), generator=g).tolist()
    ids = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in lengths]
    types = [torch.randint(0, 2, (n,), generator=g).tolist() for n in lengths]
    import numpy as np

    flat = {"input_ids": np.concatenate(ids).astype(np.int32), "token_type_ids": np.concatenate(types).astype(np.int32)}
    chunks = list(torch.randperm(23, generator=g).split(7))  # any grouping, the last one shorter
    pool = TokenizedPool(flat, np.array(lengths), chunks, pad_id=3, padding_side=side)
    for c, idx in enumerate(chunks):
        rows = idx.tolist()
        width = max(lengths[i] for i in rows)
        got = pool.features(c)
        assert torch.equal(got["input_ids"], _loop_padded([ids[i] for i in rows], width, 3, side))
        assert torch.equal(got["token_type_ids"], _loop_padded([types[i] for i in rows], width, 0, side))
        assert torch.equal(got["attention_mask"], _loop_padded([[1] * lengths[i] for i in rows], width, 0, side))


def test_the_token_cache_tokenizes_each_text_once_and_gives_the_same_step(tmp_path, monkeypatch):
    texts = [_texts(10, 1), _texts(10, 2)]
    g = torch.Generator().manual_seed(SESSION_SEED)
    guide = [torch.randn(10, 8, generator=g) for _ in range(2)]
    results, tokenized = [], []
    real = TokenCache._tokenize
    monkeypatch.setattr(TokenCache, "_tokenize", lambda self, t: (tokenized.append(len(t)), real(self, t))[1])
    for use_cache in (False, True):
        enc = make_tiny_encoder(tmp_path, dropout=0.1, seed=3)
        cache = TokenCache(enc.tokenizer, enc.max_seq_length) if use_cache else None
        tokenized.clear()
        torch.manual_seed(0)
        losses = [gradcache_step(enc, texts, guide, mini_batch_size=4, token_cache=cache) for _ in range(2)]
        results.append((losses, [p.grad.clone() for p in enc.parameters()]))
        assert tokenized == ([20] if use_cache else [20, 20])  # the second step tokenizes nothing
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert all(torch.equal(a, b) for a, b in zip(loss_a, loss_b, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))


def test_a_cache_of_another_tokenizer_or_limit_is_refused(tmp_path):
    enc = make_tiny_encoder(tmp_path)
    other = make_tiny_encoder(tmp_path / "o")
    with pytest.raises(ValueError, match="token cache holds another tokenizer or token limit"):
        tokenize_pool(enc, ["a"], 1, cache=TokenCache(other.tokenizer, enc.max_seq_length))
    with pytest.raises(ValueError, match="token cache holds another tokenizer or token limit"):
        tokenize_pool(enc, ["a"], 1, cache=TokenCache(enc.tokenizer, enc.max_seq_length - 1))


def test_training_tokenizes_the_students_texts_once_per_run(tmp_path, monkeypatch):
    student = make_tiny_encoder(tmp_path / "s", seed=0)
    student.save(tmp_path / "student")
    guide = make_tiny_encoder(tmp_path / "g", hidden_size=24, seed=1)
    guide.save(tmp_path / "guide")
    rows = [{"anchor": a, "positive": "the " + p} for a, p in zip(_texts(24, 5), _texts(24, 6), strict=True)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenized = []
    real = tokens_mod.TokenCache._tokenize
    monkeypatch.setattr(tokens_mod.TokenCache, "_tokenize", lambda self, t: (tokenized.extend(t), real(self, t))[1])
    config = TrainConfig(
        student=str(tmp_path / "student"), guide=str(tmp_path / "guide"), data=str(data),
        output=str(tmp_path / "run"), batch_size=8, mini_batch_size=5, epochs=3, max_seq_length=16,
        save_steps=0, progress=False,
    )  # fmt: skip
    Trainer(config).train()
    # 48 distinct texts: once for the guide cache, once for the student, whatever the epochs
    assert len(tokenized) == 96 and len(set(tokenized)) == 48
