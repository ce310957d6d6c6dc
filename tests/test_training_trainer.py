"""The training loop: a run ends where an interrupted-and-resumed run ends; NaN stops cleanly; the
guide cache is computed once and keyed; the saved model is the trained one."""

import json
import math
import os
import signal

import pytest
import torch

import gist_fast.training.gradcache as gradcache_mod
import gist_fast.training.guide_cache as guide_cache_mod
from gist_fast.training import NonFiniteLossError, TrainConfig, Trainer, TrainingInterrupted, load_encoder
from gist_fast.training.checkpoint import latest_checkpoint
from gist_fast.training.data import load_pairs
from gist_fast.training.guide_cache import load_or_compute_guide
from gist_fast.training.testing import make_tiny_encoder

WORDS = ["value", "file", "path", "list", "dict", "string", "error", "module", "class", "data", "time", "name"]


def _pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b, c = (WORDS[int(j)] for j in torch.randint(0, len(WORDS), (3,), generator=g))
        rows.append({"anchor": f"{a} {b} {i}", "positive": f"the {a} of the {b} and {c} {i}", "negative": f"{c} {i}"})
    return rows


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def models(tmp_path):
    student = make_tiny_encoder(tmp_path / "s", dropout=0.1, seed=0)
    student.save(tmp_path / "student")
    guide = make_tiny_encoder(tmp_path / "g", hidden_size=24, seed=1, normalize=True)
    guide.save(tmp_path / "guide")
    return str(tmp_path / "student"), str(tmp_path / "guide")


def _config(tmp_path, models, name, **kw):
    student, guide = models
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in _pairs(40)))
    base = dict(
        student=student,
        guide=guide,
        data=str(data),
        output=str(tmp_path / name),
        batch_size=8,
        mini_batch_size=5,
        max_steps=6,
        lr=1e-3,
        max_seq_length=16,
        temperature=0.05,
        save_steps=2,
        progress=False,
        cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    return load_encoder(path).model.state_dict()


def test_interrupt_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path, models):
    Trainer(_config(tmp_path, models, "full")).train()

    def ctrl_c_after_step_3(trainer, pos, loss):
        if pos.step + 1 == 3:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = _config(tmp_path, models, "cut")
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(cfg, callbacks=[ctrl_c_after_step_3]).train()
    assert info.value.checkpoint.name == "step-00000003"  # Ctrl-C wrote a checkpoint of step 3
    assert latest_checkpoint(cfg.output) == info.value.checkpoint
    assert not (tmp_path / "cut" / "model.safetensors").exists()

    steps = []
    Trainer(_config(tmp_path, models, "cut", resume=True), callbacks=[lambda t, p, loss: steps.append(p.step)]).train()
    assert steps == [3, 4, 5]
    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    changed = _weights(models[0])
    assert any(not torch.equal(full[k], changed[k]) for k in full)  # training did move the weights
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    log = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert any(r.get("event") == "resume" for r in log)


def test_one_epoch_by_default_and_epochs_count(tmp_path, models):
    steps = []
    Trainer(_config(tmp_path, models, "e1", max_steps=None), callbacks=[lambda t, p, loss: steps.append(p)]).train()
    assert len(steps) == 5 and {p.epoch for p in steps} == {0}  # 40 rows, batch 8, no duplicates
    steps.clear()
    Trainer(
        _config(tmp_path, models, "e2", max_steps=None, epochs=2), callbacks=[lambda t, p, l: steps.append(p)]
    ).train()
    assert [p.epoch for p in steps] == [0] * 5 + [1] * 5


def test_resume_refuses_a_different_run(tmp_path, models):
    Trainer(_config(tmp_path, models, "r", max_steps=3)).train()
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(_config(tmp_path, models, "r", max_steps=3, batch_size=6, resume=True)).train()


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, models, monkeypatch):
    real = gradcache_mod.gist_loss
    calls = []

    def sometimes_nan(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(gradcache_mod, "gist_loss", sometimes_nan)
    cfg = _config(tmp_path, models, "nan")
    with pytest.raises(NonFiniteLossError, match=r"nan at step 5 .*step-00000004"):
        Trainer(cfg).train()
    assert latest_checkpoint(cfg.output).name == "step-00000004"
    log = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "nonfinite" and log[-1]["step"] == 5


def test_final_model_is_the_trained_student_and_evaluates(tmp_path, models):
    cfg = _config(tmp_path, models, "ev", eval_data=str(tmp_path / "train.jsonl"), max_steps=4)
    trainer = Trainer(cfg)
    results = trainer.train()
    assert set(results) >= {"before", "after", "output"}
    again = load_encoder(tmp_path / "ev")
    texts = ["value of the file", "a list of data"]
    trainer.student.eval()
    torch.testing.assert_close(again.encode(texts), trainer.student.encode(texts), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["after"] == results["after"]
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tmp_path / "ev"), device="cpu")
    got = torch.as_tensor(st.encode(texts, convert_to_numpy=True))
    torch.testing.assert_close(got, trainer.student.encode(texts), rtol=1e-5, atol=1e-6)


def test_guide_cache_is_computed_once_and_keyed(tmp_path, monkeypatch):
    guide = make_tiny_encoder(tmp_path / "g", hidden_size=24, seed=1)
    data = load_pairs(_pairs(30))
    calls = []
    real_encode = guide.encode

    def counting(texts, **kw):
        calls.append(len(texts))
        return real_encode(texts, **kw)

    monkeypatch.setattr(guide, "encode", counting)
    first = load_or_compute_guide(guide, data, tmp_path / "c", progress=False)
    assert sum(calls) == len(data.unique_texts())
    # row i of each column is that text's guide embedding
    direct = real_encode([data.positives[7]], max_length=guide.max_seq_length)
    torch.testing.assert_close(first.batch([7])[1], direct, rtol=1e-5, atol=1e-6)
    calls.clear()
    again = load_or_compute_guide(guide, data, tmp_path / "c", progress=False)
    assert calls == [] and torch.equal(again.table, first.table)
    assert load_or_compute_guide(guide, data, tmp_path / "c", max_length=8, progress=False).key != first.key
    assert calls, "a new max length must recompute"
    calls.clear()
    other = load_pairs(_pairs(30, seed=5))
    assert load_or_compute_guide(guide, other, tmp_path / "c", progress=False).key != first.key and calls
    with torch.no_grad():
        guide.model.embeddings.word_embeddings.weight.add_(0.1)
    assert load_or_compute_guide(guide, data, tmp_path / "c", progress=False).key != first.key


def test_guide_cache_resumes_from_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(guide_cache_mod, "SHARD_TEXTS", 16)
    guide = make_tiny_encoder(tmp_path / "g", hidden_size=24, seed=1)
    data = load_pairs(_pairs(30))  # 90 distinct texts -> 6 shards
    real_encode = guide.encode
    calls = []

    def crash_in_third_shard(texts, **kw):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(texts, **kw)

    monkeypatch.setattr(guide, "encode", crash_in_third_shard)
    with pytest.raises(KeyboardInterrupt):
        load_or_compute_guide(guide, data, tmp_path / "c", batch_size=2, progress=False)
    calls.clear()
    monkeypatch.setattr(guide, "encode", lambda texts, **kw: (calls.append(len(texts)), real_encode(texts, **kw))[1])
    table = load_or_compute_guide(guide, data, tmp_path / "c", batch_size=2, progress=False)
    assert sum(calls) == 90 - 32  # the two finished shards were not recomputed
    torch.testing.assert_close(table.table, real_encode(data.unique_texts()), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_path_runs(tmp_path, models):
    """The CUDA configuration's code path (bf16 autocast, bf16 guide table) exercised on the CPU."""
    cfg = _config(tmp_path, models, "bf16", bf16="on", max_steps=2, eval_data=str(tmp_path / "train.jsonl"))
    results = Trainer(cfg).train()
    assert results["steps"] == 2 and 0 <= results["after"]["ndcg@10"] <= 1
    log = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r)
    (cache,) = (tmp_path / "cache").glob("guide-*.pt")
    assert torch.load(cache, weights_only=True)["table"].dtype == torch.bfloat16
