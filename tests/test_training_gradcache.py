"""GradCache step == plain full-batch step (dropout off); RNG replay reproduces dropout masks."""

import pytest
import torch

from gist_fast import gist_loss
from gist_fast.training.encoders import enable_checkpointing
from gist_fast.training.gradcache import LossOptions, NonFiniteLossError, RandContext, gradcache_step
from gist_fast.training.testing import make_tiny_encoder

WORDS = [
    "the",
    "value",
    "of",
    "a",
    "file",
    "path",
    "returns",
    "list",
    "dict",
    "string",
    "error",
    "raise",
    "module",
    "class",
    "function",
    "data",
    "time",
]


def _texts(n, seed, lo=2, hi=14):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=g)]
        out.append(" ".join(words) + f" {i}")
    return out


def _guide(n, dg, seed):
    return torch.randn(n, dg, generator=torch.Generator().manual_seed(seed))


def _plain_grads(enc, columns, guide_cols, opts):
    enc.zero_grad()
    embs = [enc(enc.tokenize(col)) for col in columns]
    loss = gist_loss(embs[0], embs[1], guide_cols[0], guide_cols[1], embs[2:] or None, guide_cols[2:] or None, **opts)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mini", [4, 5, 64])  # divides 3*12 / does not / one mini-batch holds all
@pytest.mark.parametrize("negatives", [0, 1])
def test_gradcache_matches_full_batch(tmp_path, mini, negatives):
    batch = 12
    enc = make_tiny_encoder(tmp_path, dropout=0.0)
    enc.train()
    columns = [_texts(batch, s) for s in range(2 + negatives)]
    guide_cols = [_guide(batch, 24, 10 + s) for s in range(2 + negatives)]
    # a margin keeps some entries masked, so the test exercises the guide filter too
    opts = LossOptions(temperature=0.05, margin=0.1)
    want_loss, want = _plain_grads(enc, columns, guide_cols, opts.kwargs())

    enc.zero_grad()
    loss = gradcache_step(enc, columns, guide_cols, mini_batch_size=mini, loss_options=opts)
    got = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and len(got) > 10
    # atol only absorbs float32 noise on gradients that are ~0 in exact arithmetic (key biases)
    scale = max(w.abs().max().item() for w in want.values())
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")


def test_gradcache_detects_a_wrong_gradient(tmp_path):
    """The comparison above can fail: a step without the guide filter gives other gradients."""
    enc = make_tiny_encoder(tmp_path)
    columns = [_texts(8, 0), _texts(8, 1)]
    guide_cols = [_guide(8, 16, 2), _guide(8, 16, 3)]
    _, want = _plain_grads(enc, columns, guide_cols, LossOptions(temperature=0.05, margin=0.1).kwargs())
    enc.zero_grad()
    gradcache_step(enc, columns, guide_cols, mini_batch_size=3, loss_options=LossOptions(temperature=0.05, margin=0.5))
    diffs = [not torch.allclose(p.grad, want[n], rtol=1e-4, atol=1e-7) for n, p in enc.named_parameters()]
    assert any(diffs)


def test_rng_replay_reproduces_dropout(tmp_path):
    enc = make_tiny_encoder(tmp_path, dropout=0.3)
    enc.train()
    feats = enc.tokenize(_texts(6, 0))
    state = RandContext(torch.device("cpu"))
    with torch.no_grad():
        first = enc(feats)
    other = enc(feats)  # a different dropout draw
    with state:
        again = enc(feats)
    assert not torch.allclose(first, other)
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_gradcache_with_dropout_uses_the_same_masks_in_both_passes(tmp_path):
    """With dropout on, each mini-batch's second pass must see the masks of its first pass: the loss
    returned equals the loss of the embeddings the second pass produced."""
    enc = make_tiny_encoder(tmp_path, dropout=0.3)
    enc.train()
    columns = [_texts(10, 0), _texts(10, 1)]
    guide_cols = [_guide(10, 16, 2), _guide(10, 16, 3)]
    seen = []
    orig = enc.forward

    def spy(features):
        out = orig(features)
        seen.append(out.detach().clone())
        return out

    enc.forward = spy
    gradcache_step(enc, columns, guide_cols, mini_batch_size=7)
    half = len(seen) // 2
    assert half == 3
    for a, b in zip(seen[:half], seen[half:], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_nonfinite_loss_raises_before_backward(tmp_path):
    enc = make_tiny_encoder(tmp_path)
    columns = [_texts(4, 0), _texts(4, 1)]
    bad = _guide(4, 8, 0)
    bad[0, 0] = float("nan")
    enc.zero_grad()
    with pytest.raises((NonFiniteLossError, ValueError)):
        gradcache_step(enc, columns, [bad, _guide(4, 8, 1)], mini_batch_size=2)
    assert all(p.grad is None for p in enc.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    columns = [_texts(9, 0), _texts(9, 1)]
    guide_cols = [_guide(9, 16, 2), _guide(9, 16, 3)]
    grads = []
    for checkpointing in (False, True):
        enc = make_tiny_encoder(tmp_path, dropout=0.0)
        enc.train()
        if checkpointing:
            enable_checkpointing(enc.model)
        gradcache_step(enc, columns, guide_cols, mini_batch_size=4)
        grads.append([p.grad.clone() for p in enc.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
