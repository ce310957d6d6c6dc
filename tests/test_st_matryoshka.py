"""gist-fast's ``MatryoshkaLoss`` against sentence-transformers' own, on the real all-MiniLM-L6-v2.

Both wrap a GIST loss (plain or cached; pairs and triplets) at several dims; ours computes every
dim in one `gist_loss` call, theirs one full loss per dim. In float64 with dropout off (the models
and texts of test_sentence_transformers_dropin.py: a perturbed student, distinct generated texts)
the two must agree to rounding: loss and every parameter gradient within 1e-9 relative
(``assert_same``). Also checked: the one-pass path really is taken (one loss call, one guide
forward), ``n_dims_per_step`` draws the same dims as theirs, and any other loss, or a guide that
is the model itself, gets their per-dim path unchanged.
"""

from __future__ import annotations

import inspect
import random

import pytest
import test_sentence_transformers_dropin as dropin
import torch
from problems import SESSION_SEED
from test_sentence_transformers_dropin import assert_same, features, loss_and_grads, make_texts

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")

from gist_fast.integrations import sentence_transformers as gf  # noqa: E402

models = dropin.models  # the module-scoped fixture: perturbed float64 student, guide

# all-MiniLM-L6-v2 has d = 384: the full dim, dims that are no multiple of any block width, and 1.
DIMS = [384, 200, 65, 17, 1]
WEIGHTS = [1.0, 0.5, 2.0, 0.25, 1.5]

CASES = [
    # (cached, columns, options)
    (False, 2, {}),
    (False, 3, {"margin_strategy": "relative", "margin": 0.05, "temperature": 0.05}),
    (True, 2, {"margin": 0.05, "temperature": 0.05}),
    (True, 3, {"contrast_anchors": False, "margin": 0.1, "temperature": 0.1}),
]


def inner(cls_pair, cached: bool, student, guide, options):
    ours_cls, theirs_cls = cls_pair[cached]
    extra = {"mini_batch_size": 4} if cached else {}
    return ours_cls(student, guide, **options, **extra), theirs_cls(student, guide, **options, **extra)


GIST_CLASSES = {
    False: (gf.GISTEmbedLoss, st_losses.GISTEmbedLoss),
    True: (gf.CachedGISTEmbedLoss, st_losses.CachedGISTEmbedLoss),
}


@pytest.mark.parametrize(
    ("cached", "columns", "options"), CASES, ids=["plain-pairs", "plain-triplets", "cached-pairs", "cached-triplets"]
)
def test_matches_sentence_transformers(models, cached, columns, options):
    student, guide = models["student"], models["guide"]
    texts = make_texts(columns, 6, SESSION_SEED + 60 + columns + 10 * cached)
    ours_inner, theirs_inner = inner(GIST_CLASSES, cached, student, guide, options)
    ours = gf.MatryoshkaLoss(student, ours_inner, DIMS, WEIGHTS)
    theirs = st_losses.MatryoshkaLoss(student, theirs_inner, DIMS, WEIGHTS)
    assert ours.one_pass
    assert_same(loss_and_grads(ours, student, texts), loss_and_grads(theirs, student, texts), f"{cached} {options}")
    assert ours.get_config_dict() == theirs.get_config_dict()


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_sampled_dims_per_step_match(models, cached):
    """n_dims_per_step = 2 of 5: the same random draw picks the same dims as theirs."""
    student, guide = models["student"], models["guide"]
    texts = make_texts(3, 4, SESSION_SEED + 70 + cached)
    ours_inner, theirs_inner = inner(GIST_CLASSES, cached, student, guide, {"margin": 0.05})
    ours = gf.MatryoshkaLoss(student, ours_inner, DIMS, WEIGHTS, n_dims_per_step=2)
    theirs = st_losses.MatryoshkaLoss(student, theirs_inner, DIMS, WEIGHTS, n_dims_per_step=2)
    for step in range(2):
        seed = SESSION_SEED * 10 + step
        random.seed(seed)
        ours_result = loss_and_grads(ours, student, texts)
        random.seed(seed)
        theirs_result = loss_and_grads(theirs, student, texts)
        assert_same(ours_result, theirs_result, f"n_dims_per_step step {step}")


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_one_pass(models, cached, monkeypatch):
    """One gist_loss call with every dim and one guide forward per column, where sentence-transformers
    runs the loss, and the guide, once per dim."""
    student, guide = models["student"], models["guide"]
    texts = make_texts(3, 4, SESSION_SEED + 80)
    calls = []
    real = gf.gist_loss
    monkeypatch.setattr(gf, "gist_loss", lambda *a, **kw: calls.append(kw.get("matryoshka_dims")) or real(*a, **kw))
    guide_rows = []
    hook = guide.register_forward_hook(lambda module, args, output: guide_rows.append(output["sentence_embedding"]))
    try:
        ours_inner, _ = inner(GIST_CLASSES, cached, student, guide, {})
        loss_and_grads(gf.MatryoshkaLoss(student, ours_inner, DIMS), student, texts)
    finally:
        hook.remove()
    assert calls == [tuple(DIMS)]
    assert sum(len(rows) for rows in guide_rows) == 3 * 4  # every text embedded by the guide once


def test_other_losses_are_wrapped_as_theirs(models):
    """A loss that is not a gist-fast GIST loss: their per-dim path, same loss and gradients."""
    student = models["student"]
    texts = make_texts(2, 5, SESSION_SEED + 90)
    dims, weights = [384, 64, 8], [1.0, 0.5, 0.25]
    mnrl = st_losses.MultipleNegativesRankingLoss
    ours = gf.MatryoshkaLoss(student, mnrl(student), dims, weights)
    theirs = st_losses.MatryoshkaLoss(student, mnrl(student), dims, weights)
    assert not ours.one_pass
    assert_same(loss_and_grads(ours, student, texts), loss_and_grads(theirs, student, texts), "MNRL")


def test_guide_that_is_the_model_keeps_their_path(models):
    """sentence-transformers truncates the guide too when the guide is the model: keep that."""
    student = models["student"]
    texts = make_texts(2, 5, SESSION_SEED + 95)
    ours = gf.MatryoshkaLoss(student, gf.GISTEmbedLoss(student, student), DIMS)
    theirs = st_losses.MatryoshkaLoss(student, st_losses.GISTEmbedLoss(student, student), DIMS)
    assert not ours.one_pass
    assert_same(loss_and_grads(ours, student, texts), loss_and_grads(theirs, student, texts), "guide is model")


def test_constructor_is_theirs(models):
    ours = list(inspect.signature(gf.MatryoshkaLoss.__init__).parameters.values())
    theirs = list(inspect.signature(st_losses.MatryoshkaLoss.__init__).parameters.values())
    assert [(p.name, p.default) for p in ours] == [(p.name, p.default) for p in theirs]
    assert issubclass(gf.MatryoshkaLoss, st_losses.MatryoshkaLoss)
    student, guide = models["student"], models["guide"]
    with pytest.raises(ValueError, match="matryoshka_weights"):
        gf.MatryoshkaLoss(student, gf.GISTEmbedLoss(student, guide), [384, 64], [1.0])
    with pytest.raises(ValueError, match="matryoshka_dims"):
        gf.MatryoshkaLoss(student, gf.GISTEmbedLoss(student, guide), [385])


def test_features_reused_across_calls(models):
    """The plain path leaves the features reusable (a second call gives the same loss)."""
    student, guide = models["student"], models["guide"]
    texts = make_texts(2, 4, SESSION_SEED + 99)
    loss = gf.MatryoshkaLoss(student, gf.GISTEmbedLoss(student, guide), DIMS)
    feats = features(student, texts)
    with torch.no_grad():
        first, second = loss(feats, None), loss(feats, None)
    torch.testing.assert_close(first, second, rtol=1e-12, atol=0)
