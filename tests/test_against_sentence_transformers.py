"""Our backends against sentence-transformers' own GISTEmbedLoss and CachedGISTEmbedLoss.

Their classes run untouched on injected embeddings (no model download): GISTEmbedLoss through
``benchmarks.st_injection`` (sentinel model and guide, ``embed_columns`` swapped), the cached one
through its ``calculate_loss(reps, reps_guided)``, which takes the per-mini-batch embeddings
directly. Both compute with torch's CosineSimilarity by broadcasting; everything runs in float64,
so the comparison is of semantics, not rounding (tolerance 1e-9 relative).
"""

from __future__ import annotations

import functools

import pytest
import torch
from problems import draw_problem, gradient_floor, option_cross_product, rng_for
from torch import nn

import gist_fast

pytest.importorskip("sentence_transformers")

from sentence_transformers.sentence_transformer.losses.cached_gist_embed import CachedGISTEmbedLoss  # noqa: E402

from benchmarks.st_injection import st_gist_loss  # noqa: E402

BACKENDS = ["reference", "torch"]
ST_OPTIONS = ("temperature", "margin_strategy", "margin", "contrast_anchors", "contrast_positives")


def st_cached_gist_loss(student, guide, *, mini_batch_size, **options):
    """sentence-transformers' CachedGISTEmbedLoss.calculate_loss on embeddings split in mini-batches."""
    loss = object.__new__(CachedGISTEmbedLoss)
    nn.Module.__init__(loss)
    loss.similarity_fct = nn.CosineSimilarity(dim=-1)
    loss.cross_entropy_loss = nn.CrossEntropyLoss()
    loss.mini_batch_size = mini_batch_size
    loss.show_progress_bar = False
    loss.gather_across_devices = False
    for key, value in options.items():
        setattr(loss, key, value)
    reps = [list(t.split(mini_batch_size)) for t in student]
    reps_guided = [list(t.split(mini_batch_size)) for t in guide]
    return loss.calculate_loss(reps, reps_guided)


def compare(ours, theirs, problem):
    """Loss and gradients of every student input, float64, relative tolerance 1e-9."""
    s1, g1 = problem.args(torch.float64)
    s2, g2 = problem.args(torch.float64)
    loss_ours = ours(s1, g1)
    loss_theirs = theirs(s2, g2)
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-9, atol=1e-10, msg=problem.describe)
    grads_ours = torch.autograd.grad(loss_ours, s1)
    grads_theirs = torch.autograd.grad(loss_theirs, s2)
    for a, b, t in zip(grads_ours, grads_theirs, problem.student, strict=True):
        # Relative to the larger of the gradient and its round-off floor: at temperature 0.01 a
        # saturated row's exact gradient is 1e-48 and both sides' round-off is about 1e-13.
        scale = max(b.abs().max().item(), gradient_floor(problem, t))
        assert (a - b).abs().max().item() <= 1e-9 * scale, problem.describe()


def ours_fn(backend, options):
    def run(student, guide):
        return gist_fast.gist_loss(
            student[0], student[1], guide[0], guide[1], student[2:] or None, guide[2:] or None,
            **options, reduction="mean", backend=backend,
        )  # fmt: skip

    return run


@pytest.mark.parametrize("options", option_cross_product(), ids=lambda o: "-".join(str(v) for v in o.values()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_gist_embed_loss(backend, options):
    """GISTEmbedLoss takes pairs or triplets (k <= 1)."""
    rng = rng_for("st", backend, options)
    options = {**options, "temperature": rng.choice([0.01, 0.05, 0.5])}
    problem = draw_problem(
        rng, rng.choice([1, 2, 17, 64]), rng.choice([7, 64]), rng.choice([5, 48]), rng.choice([0, 1]), options=options
    )

    def theirs(student, guide):
        return st_gist_loss(*student[:2], *guide[:2], *(student[2:3] or [None]), *(guide[2:3] or [None]), **options)

    compare(ours_fn(backend, options), theirs, problem)


@pytest.mark.parametrize("trial", range(12))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_cached_gist_embed_loss(backend, trial):
    """CachedGISTEmbedLoss takes any number of negative columns and chunks the rows."""
    rng = rng_for("st-cached", backend, trial)
    options = {key: rng.choice(values) for key, values in _grid().items()}
    batch = rng.choice([1, 3, 17, 64, 129])
    problem = draw_problem(rng, batch, rng.choice([7, 64]), rng.choice([5, 48]), rng.choice([0, 1, 2, 3]))
    theirs = functools.partial(st_cached_gist_loss, mini_batch_size=rng.choice([1, 5, 16, 200]), **options)
    compare(ours_fn(backend, options), theirs, problem)


def _grid():
    grid = {key: [o[key] for o in option_cross_product()] for key in option_cross_product()[0]}
    grid["temperature"] = [0.01, 0.05, 0.5]
    return grid


def test_injection_is_sensitive():
    """The oracle itself can disagree: a different margin gives a different loss."""
    rng = rng_for("st-sensitive")
    problem = draw_problem(rng, 17, 8, 6, 1)
    s, g = problem.args(torch.float64, requires_grad=False)
    kw = dict(temperature=0.5, margin_strategy="absolute", contrast_anchors=True, contrast_positives=True)
    a = st_gist_loss(*s[:2], *g[:2], s[2], g[2], margin=0.0, **kw)
    b = st_gist_loss(*s[:2], *g[:2], s[2], g[2], margin=0.3, **kw)
    assert not torch.allclose(a, b)
    ours = gist_fast.gist_loss(*s[:2], *g[:2], s[2], g[2], margin=0.3, **kw)
    torch.testing.assert_close(ours, b)
