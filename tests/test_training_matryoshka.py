"""Matryoshka training: --matryoshka-dims / --matryoshka-weights checked before any work (errors name
the option as spelled); the GradCache step's gradients are the Matryoshka loss's on the whole batch;
evaluation reports retrieval metrics per size; the saved model records its sizes and loads in
sentence-transformers at each of them (``truncate_dim``); ``gist-fast eval`` scores a size."""

import json

import pytest
import torch
from problems import SESSION_SEED, rng_for

import gist_fast.training.trainer as trainer_mod
from gist_fast import gist_loss
from gist_fast.cli import main
from gist_fast.training import TrainConfig, Trainer
from gist_fast.training.checkpoint import latest_checkpoint
from gist_fast.training.data import load_pairs
from gist_fast.training.evaluation import METRICS, metrics_by_dim, retrieval_metrics
from gist_fast.training.gradcache import LossOptions, gradcache_step
from gist_fast.training.testing import make_tiny_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["value", "file", "path", "list", "dict", "string", "error", "module", "class", "data", "time", "name"]
STUDENT_DIM, GUIDE_DIM = 32, 24
DIMS, WEIGHTS = [32, 16, 4], [1.0, 0.5, 2.0]


def _seed(*key) -> int:
    return rng_for("training-matryoshka", *key).randrange(2**31)


def _pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b, c = (WORDS[int(j)] for j in torch.randint(0, len(WORDS), (3,), generator=g))
        rows.append({"anchor": f"{a} {b} {i}", "positive": f"the {a} of the {b} and {c} {i}", "negative": f"{c} {i}"})
    return rows


def _write_pairs(path, n, seed):
    path.write_text("".join(json.dumps(r) + "\n" for r in _pairs(n, seed)))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("matryoshka")
    make_tiny_encoder(root / "s", hidden_size=STUDENT_DIM, seed=_seed("student")).save(root / "student")
    make_tiny_encoder(root / "g", hidden_size=GUIDE_DIM, seed=_seed("guide"), normalize=True).save(root / "guide")
    return {
        "root": root,
        "student": str(root / "student"),
        "guide": str(root / "guide"),
        "data": _write_pairs(root / "train.jsonl", 24, _seed("train")),
        "eval": _write_pairs(root / "eval.jsonl", 16, _seed("eval")),
    }


def _config(files, output, **kw):
    base = dict(
        student=files["student"],
        guide=files["guide"],
        data=files["data"],
        output=str(output),
        batch_size=8,
        mini_batch_size=5,
        max_steps=2,
        lr=1e-3,
        max_seq_length=16,
        temperature=0.05,
        save_steps=0,
        progress=False,
        cache_dir=str(files["root"] / "cache"),
        matryoshka_dims=DIMS,
        matryoshka_weights=WEIGHTS,
    )
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------ option checks
@pytest.mark.parametrize(
    ("flag", "value", "what"),
    [
        ("--matryoshka-dims", "32,32", "distinct integers"),
        ("--matryoshka-dims", "16,0", ">= 1"),
        ("--matryoshka-dims", "16,x", "integers"),
        ("--matryoshka-dims", "16.5", "integers"),
        ("--matryoshka-dims", "", "non-empty"),
        ("--matryoshka-weights", "1,0", "> 0"),
        ("--matryoshka-weights", "1,-2", "> 0"),
        ("--matryoshka-weights", "1,inf", "finite"),
        ("--matryoshka-weights", "nan", "finite"),
    ],
)
def test_flags_are_checked_naming_the_flag(capsys, flag, value, what):
    with pytest.raises(SystemExit) as info:
        main(["train", f"{flag}={value}"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: must be" in err and what in err, err


@pytest.mark.parametrize(
    ("key", "value", "what"),
    [
        ("matryoshka-dims", [16, 16], "distinct integers"),
        ("matryoshka_dims", [], "non-empty"),
        ("matryoshka_dims", "16,8", "a non-empty list"),
        ("matryoshka_dims", [16, True], "integers"),
        ("matryoshka_weights", [1, 0], "> 0"),
        ("matryoshka_weights", ["1"], "finite numbers"),
    ],
)
def test_config_file_values_are_checked_naming_the_key(tmp_path, capsys, key, value, what):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"data": "x.jsonl", key: value}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f'{path}: "{key}": must be' in err and what in err, err


def test_weights_must_match_the_dims(capsys, tmp_path):
    assert main(["train", "--data", "x.jsonl", "--matryoshka-dims", "16,8", "--matryoshka-weights", "1"]) == 2
    err = capsys.readouterr().err
    assert "--matryoshka-weights: must hold one weight per entry of --matryoshka-dims (2); got 1" in err, err
    assert main(["train", "--data", "x.jsonl", "--matryoshka-weights", "1,1"]) == 2
    err = capsys.readouterr().err
    assert "--matryoshka-weights: given without --matryoshka-dims" in err, err
    path = tmp_path / "run.toml"
    path.write_text('data = "x.jsonl"\nmatryoshka-dims = [16, 8]\nmatryoshka-weights = [1.0, 2.0, 3.0]\n')
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f'{path}: "matryoshka-weights": must hold one weight per entry of {path}: "matryoshka-dims"' in err, err
    with pytest.raises(ValueError, match=r"^matryoshka_weights: must hold one weight per entry of matryoshka_dims"):
        TrainConfig(matryoshka_dims=[8], matryoshka_weights=[1.0, 1.0]).validate()


def test_sizes_above_the_students_dim_are_refused_before_any_work(files, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--student", files["student"], "--guide", files["guide"], "--data", files["data"]]
    assert main([*argv, "--output", str(out), "--matryoshka-dims", "16,64,48", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--matryoshka-dims: every size must be at most {STUDENT_DIM}, the embedding dim of the student " in err
    assert "got 64, 48" in err, err
    assert not out.exists()  # nothing written: no lock, cache or student-init
    # the default student (the guide's first layers) has the guide's dim
    argv = ["train", "--guide", files["guide"], "--data", files["data"], "--output", str(out)]
    assert main([*argv, "--matryoshka-dims", str(STUDENT_DIM), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--matryoshka-dims: every size must be at most {GUIDE_DIM}, the embedding dim of the default student" in err
    assert not out.exists()
    # in Python the field is named, and an in-memory student is measured too
    student = make_tiny_encoder(tmp_path / "mem", hidden_size=8)
    with pytest.raises(ValueError, match="^matryoshka_dims: every size must be at most 8, .*got 32, 16"):
        Trainer(_config(files, out), student=student).train()
    assert not out.exists()


# ------------------------------------------------------------------------------ the step's gradients
def _texts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (int(k),), generator=g)) + f" {i}"
            for i, k in enumerate(torch.randint(2, 12, (n,), generator=g))]  # fmt: skip


def _full_batch_grads(encoder, columns, guide_columns, **loss_kwargs):
    """Loss and parameter gradients (by name; parameters the loss does not use left out) of one plain
    full-batch forward (no GradCache, nothing cached)."""
    named = [(n, p) for n, p in encoder.named_parameters() if p.requires_grad]
    embs = [encoder(encoder.tokenize(col)) for col in columns]
    loss = gist_loss(embs[0], embs[1], *guide_columns[:2], embs[2:] or None, guide_columns[2:] or None, **loss_kwargs)
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return loss.detach(), {n: g for (n, _), g in zip(named, grads, strict=True) if g is not None}


def _grads(encoder):
    return {n: p.grad for n, p in encoder.named_parameters() if p.grad is not None}


def _assert_grads_close(got, want):
    assert got.keys() == want.keys() and len(want) > 10
    scale = max(w.abs().max().item() for w in want.values())
    for name, w in want.items():  # atol: float32 noise on gradients ~0 in exact arithmetic
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("negatives", [0, 1])
def test_gradcache_step_gives_the_matryoshka_losss_gradients(tmp_path, negatives):
    enc = make_tiny_encoder(tmp_path, hidden_size=STUDENT_DIM, seed=_seed("step", negatives))
    enc.train()
    batch, seed = 12, _seed("texts", negatives)
    columns = [_texts(batch, seed + s) for s in range(2 + negatives)]
    g = torch.Generator().manual_seed(seed)
    guide_columns = [torch.randn(batch, GUIDE_DIM, generator=g) for _ in columns]
    options = LossOptions(temperature=0.05, margin=0.1, matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS)
    want_loss, want = _full_batch_grads(enc, columns, guide_columns, **options.kwargs())
    plain_loss, plain = _full_batch_grads(enc, columns, guide_columns, temperature=0.05, margin=0.1)

    enc.zero_grad()
    loss = gradcache_step(enc, columns, guide_columns, mini_batch_size=5, loss_options=options)
    got = _grads(enc)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    _assert_grads_close(got, want)
    # the comparison can fail: the loss without the sizes has other gradients
    assert abs(float(plain_loss) - float(want_loss)) > 1e-3
    with pytest.raises(AssertionError):
        _assert_grads_close(plain, want)


def test_a_training_step_uses_the_matryoshka_loss(files, tmp_path, monkeypatch):
    """In a run of the trainer, the first step's gradients equal those of the Matryoshka loss (the
    run's sizes and weights) computed directly on the whole batch."""
    real_step = trainer_mod.gradcache_step
    checked = []

    def checking_step(encoder, columns, guide_columns, **kw):
        want_loss, want = _full_batch_grads(
            encoder, columns, guide_columns, temperature=0.05, matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS
        )
        loss = real_step(encoder, columns, guide_columns, **kw)
        if not checked:
            torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
            _assert_grads_close(_grads(encoder), want)
            checked.append(float(loss))
        return loss

    monkeypatch.setattr(trainer_mod, "gradcache_step", checking_step)
    Trainer(_config(files, tmp_path / "run", max_steps=1)).train()
    assert checked, "the step was not called"


# ------------------------------------------------------------------------------ evaluation and the saved model
@pytest.fixture(scope="module")
def run(files):
    trainer = Trainer(_config(files, files["root"] / "run", eval_data=files["eval"], save_steps=1))
    return trainer, trainer.train()


def _embeddings(encode, data):
    """Queries (distinct anchors), corpus (distinct positives) and relevance, as evaluate() builds them."""
    anchors, docs = list(dict.fromkeys(data.anchors)), list(dict.fromkeys(data.positives))
    relevant = [set() for _ in anchors]
    for a, p in zip(data.anchors, data.positives, strict=True):
        relevant[anchors.index(a)].add(docs.index(p))
    return torch.as_tensor(encode(anchors)), torch.as_tensor(encode(docs)), relevant


def test_metrics_per_size_are_retrieval_with_truncated_embeddings():
    rng = rng_for("metrics-by-dim")
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    # the first 2 features are shared noise, the rest tell the pairs apart: truncation hurts
    docs = torch.cat([torch.randn(1, 2, generator=g).expand(20, 2), torch.randn(20, 6, generator=g)], dim=1)
    queries = docs + 0.1 * torch.randn(20, 8, generator=g)
    relevant = [{i} for i in range(20)]
    by_dim = metrics_by_dim(queries, docs, relevant, [8, 2, 5])
    assert list(by_dim) == ["8", "2", "5"]
    for m in (8, 2, 5):  # the first m features, normalised after truncation
        q = torch.nn.functional.normalize(queries[:, :m], dim=1)
        c = torch.nn.functional.normalize(docs[:, :m], dim=1)
        want = retrieval_metrics(q, c, relevant)
        assert by_dim[str(m)] == {k: want[k] for k in METRICS}, (m, SESSION_SEED)
    assert by_dim["8"]["recall@1"] > by_dim["2"]["recall@1"]
    with pytest.raises(ValueError, match=r"must lie in \[1, 8\].*\[9\]"):
        metrics_by_dim(queries, docs, relevant, [4, 9])


def test_evaluation_reports_each_size(run, files):
    trainer, results = run
    saved = json.loads((files["root"] / "run" / "results.json").read_text())
    for when in ("before", "after"):
        assert list(results[when]["dims"]) == [str(m) for m in DIMS]
        assert saved[when]["dims"] == results[when]["dims"]
        for per in results[when]["dims"].values():
            assert set(per) == set(METRICS)
        # the full size is the untruncated score
        assert results[when]["dims"][str(STUDENT_DIM)] == {k: results[when][k] for k in METRICS}
    events = [json.loads(line) for line in (files["root"] / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e.get("event") == "eval"]
    assert [e["when"] for e in evals] == ["before", "after"] and all("dims" in e for e in evals)
    # each size's metrics are those of the saved model's embeddings truncated to it
    data = load_pairs(files["eval"])
    trainer.student.eval()
    q, c, relevant = _embeddings(lambda t: trainer.student.encode(t), data)
    for m in DIMS:
        want = retrieval_metrics(q[:, :m], c[:, :m], relevant)
        got = results["after"]["dims"][str(m)]
        assert got == pytest.approx({k: want[k] for k in METRICS}, abs=1e-6), m


def test_saved_model_records_its_sizes_and_loads_truncated(run, files):
    from sentence_transformers import SentenceTransformer

    trainer, results = run
    path = files["root"] / "run"
    config = json.loads((path / "config_sentence_transformers.json").read_text())
    assert config["matryoshka_dims"] == DIMS and "truncate_dim" not in config
    checkpoint = latest_checkpoint(path) / "model"  # the checkpoints' models record them too
    assert json.loads((checkpoint / "config_sentence_transformers.json").read_text())["matryoshka_dims"] == DIMS
    texts = [r["anchor"] for r in _pairs(6, _seed("texts"))]
    trainer.student.eval()
    full = trainer.student.encode(texts)
    st = SentenceTransformer(str(path), device="cpu")
    assert st.truncate_dim is None  # full size by default
    torch.testing.assert_close(torch.as_tensor(st.encode(texts)), full, rtol=1e-5, atol=1e-6)
    data = load_pairs(files["eval"])
    for m in DIMS:
        st = SentenceTransformer(str(path), device="cpu", truncate_dim=m)
        got = torch.as_tensor(st.encode(texts))
        assert got.shape == (len(texts), m)
        torch.testing.assert_close(got, full[:, :m], rtol=1e-5, atol=1e-6)
        # retrieval with sentence-transformers' truncated embeddings scores as the trainer reported
        q, c, relevant = _embeddings(lambda t, st=st: st.encode(t), data)
        want = retrieval_metrics(q, c, relevant)
        assert results["after"]["dims"][str(m)] == pytest.approx({k: want[k] for k in METRICS}, abs=1e-6), m


def test_gist_fast_eval_scores_each_size(run, files, capsys):
    _, results = run
    model = str(files["root"] / "run")
    assert main(["eval", "--model", model, "--data", files["eval"], "--json"]) == 0
    recorded = json.loads(capsys.readouterr().out)
    assert list(recorded["dims"]) == [str(m) for m in DIMS]  # the sizes the model records
    for m, per in results["after"]["dims"].items():
        assert recorded["dims"][m] == pytest.approx(per, abs=1e-6), m
    assert main(["eval", "--model", model, "--data", files["eval"], "--json", "--truncate-dim", "16"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["truncate_dim"] == 16 and "dims" not in one
    assert {k: one[k] for k in METRICS} == pytest.approx(results["after"]["dims"]["16"], abs=1e-6)
    assert main(["eval", "--model", model, "--data", files["eval"], "--json", "--matryoshka-dims", "8,2"]) == 0
    assert list(json.loads(capsys.readouterr().out)["dims"]) == ["8", "2"]
    assert main(["eval", "--model", model, "--data", files["eval"]]) == 0
    text = capsys.readouterr().out
    assert all(f"dim {m}: ndcg@10" in text for m in DIMS), text
    assert main(["eval", "--model", model, "--data", files["eval"], "--truncate-dim", "33"]) == 2
    err = capsys.readouterr().err
    assert f"--truncate-dim: every size must be at most {STUDENT_DIM}, the embedding dim of the model" in err, err
    assert main(["eval", "--model", model, "--data", files["eval"], "--matryoshka-dims", "8,40"]) == 2
    assert "--matryoshka-dims: every size must be at most 32" in capsys.readouterr().err
