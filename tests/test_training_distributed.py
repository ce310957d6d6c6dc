"""Training under ``torchrun --nproc_per_node 2`` (CPU, gloo) equals one process with the same global batch.

A few GradCache steps of a tiny student (dropout off) run once in this process and once under
torchrun: each rank encodes half of every batch of 8 rows (mini-batches of 3 texts, so the two runs
cut their mini-batches differently), the loss gathers the candidates (and the anchors) over the
ranks, and the gradients are averaged once per step. Checked: both ranks end with bit-identical
parameters, rank 0's saved model is that model, and it equals the single-process model to float32
round-off; the logged per-step loss and (unclipped) gradient norm equal the single-process ones,
which a wrong gradient scale (e.g. a sum over ranks instead of a mean) would break even though
AdamW's update hides most of it. A second torchrun run, started through the ``gist-fast`` command
from a copy of the first run's step-2 checkpoint with ``--resume``, ends at the same model. Only
rank 0 writes the metrics log, checkpoints and the final model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gist_fast.cli import build_parser, train_config_from_args
from gist_fast.training import Trainer, load_encoder, testing
from gist_fast.training import distributed as dtrain
from gist_fast.training.testing import make_tiny_encoder, make_tiny_tokenizer

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
    pytest.mark.usefixtures("one_thread"),
]

WORDS = ["value", "file", "path", "list", "dict", "string", "error", "module", "class", "data", "time", "name"]
STEPS = 4

# Run under torchrun: train with the command's arguments, then dump this rank's parameters.
RANK_SCRIPT = """
import os, sys
import torch
from gist_fast.cli import build_parser, train_config_from_args
from gist_fast.training import Trainer
from gist_fast.training import distributed as dtrain

dump_dir, argv = sys.argv[1], sys.argv[2:]
trainer = Trainer(train_config_from_args(build_parser().parse_args(argv)))
trainer.train()
assert trainer.dist.world == int(os.environ["WORLD_SIZE"]) == 2, trainer.dist
state = {k: v.detach().cpu().clone() for k, v in trainer.student.model.state_dict().items()}
torch.save(state, os.path.join(dump_dir, f"rank{trainer.dist.rank}.pt"))
dtrain.barrier(trainer.dist)
dtrain.exit_process(0)  # as gist_fast.cli.run does
"""


def _tiny_tokenizer(directory):
    """``make_tiny_tokenizer``, with its vocabulary: under transformers 5, ``BertTokenizerFast(vocab_file=...)``
    keeps only the special tokens, so every word would be [UNK] and every text the same embedding."""
    from transformers import BertTokenizerFast

    tok = make_tiny_tokenizer(directory)
    words = (Path(directory) / "vocab.txt").read_text().split()
    if len(tok.get_vocab()) < len(words):
        tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    return tok


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setattr(testing, "make_tiny_tokenizer", _tiny_tokenizer)
    make_tiny_encoder(tmp_path / "s", dropout=0.0, seed=0).save(tmp_path / "student")
    make_tiny_encoder(tmp_path / "g", hidden_size=24, seed=1, normalize=True).save(tmp_path / "guide")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(32):
        a, b, c = (WORDS[int(j)] for j in torch.randint(0, len(WORDS), (3,), generator=g))
        rows.append({"anchor": f"{a} {b} {i}", "positive": f"the {a} of the {b} and {c} {i}", "negative": f"{c} {i}"})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rank_script.py").write_text(RANK_SCRIPT)
    return tmp_path


def _args(p: Path, output: str, *extra: str) -> list[str]:
    return [
        "train", "--student", str(p / "student"), "--guide", str(p / "guide"), "--data", str(p / "train.jsonl"),
        "--output", str(p / output), "--cache-dir", str(p / "cache"), "--batch-size", "8", "--mini-batch-size", "3",
        "--max-steps", str(STEPS), "--save-steps", "2", "--lr", "2e-3", "--warmup-steps", "1", "--max-seq-length", "16",
        "--temperature", "0.05", "--margin", "0.05", "--loss-backend", "torch", "--device", "cpu", "--threads", "1",
        "--no-progress", *extra,
    ]  # fmt: skip


def _torchrun(p: Path, *command: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", GIST_FAST_DIST_TIMEOUT_S="120", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *command]
    proc = subprocess.run(cmd, cwd=p, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


def _log(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def _rel_diff(a: dict, b: dict) -> float:
    """max over tensors of |a - b| / max(|b|) ... as one number: ||a - b|| / ||b|| over all parameters."""
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b)
    den = sum(float(b[k].double().square().sum()) for k in b)
    return (num / den) ** 0.5


def _max_abs(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


def test_torchrun_two_ranks_equal_one_process_with_the_same_global_batch(setup):
    p = setup
    start = load_encoder(str(p / "student")).model.state_dict()
    # one process, the whole batch of 8 rows per step
    single_args = _args(p, "single")
    Trainer(train_config_from_args(build_parser().parse_args(single_args))).train()
    single = load_encoder(str(p / "single")).model.state_dict()
    assert _rel_diff(start, single) > 1e-3  # training moved the weights (the comparison below means something)

    # two processes, 4 rows each per step
    _torchrun(p, str(p / "rank_script.py"), str(p), *_args(p, "ddp"))
    rank0 = torch.load(p / "rank0.pt", weights_only=True)
    rank1 = torch.load(p / "rank1.pt", weights_only=True)
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f"{k} differs between the ranks"
    saved = load_encoder(str(p / "ddp")).model.state_dict()
    for k in saved:
        assert torch.equal(saved[k], rank0[k]), f"rank 0's saved model differs from its parameters at {k}"

    update = _rel_diff(single, start)
    err = _rel_diff(saved, single)
    assert err < 1e-5, f"||ddp - single|| / ||single|| = {err:.2e} (the update itself is {update:.2e})"
    assert _max_abs(saved, single) < 1e-5

    # the same loss and gradient norm at every step (a gradient scale error shows here)
    want, got = _log(p / "single" / "metrics.jsonl"), _log(p / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)) and [r["rows"] for r in got] == [8] * STEPS
    for w, g in zip(want, got, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), (w, g)
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), (w, g)
    lines = (p / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert sum('"event": "start"' in line for line in lines) == 1  # rank 0 alone writes the log
    assert sorted(c.name for c in (p / "ddp" / "checkpoints").glob("step-*")) == ["step-00000002"]

    # resume under torchrun through the command, from a copy of the step-2 checkpoint
    shutil.copytree(p / "ddp" / "checkpoints", p / "resumed" / "checkpoints")
    proc = _torchrun(p, "-m", "gist_fast.cli", *_args(p, "resumed", "--resume"))
    assert proc.stdout.count("model: ") == 1  # rank 0 alone prints the result
    resumed = load_encoder(str(p / "resumed")).model.state_dict()
    assert _max_abs(resumed, saved) < 1e-6, _max_abs(resumed, saved)
    assert [r["step"] for r in _log(p / "resumed" / "metrics.jsonl")] == [3, 4]


def test_anchors_as_a_gathered_candidate_column_give_the_anchor_block():
    """What ``global_anchor_block`` relies on: the anchors passed as one more negative column (with the
    guide's anchors) and ``contrast_anchors=False`` give the loss and gradients of ``contrast_anchors=True``."""
    import gist_fast

    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ga, gp, gn = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ga = ga + 2 * gp  # guide anchors close to their positives: some candidates are masked, some kept
    for options in ({"margin": 0.05}, {"margin_strategy": "relative", "margin": 0.1, "contrast_positives": False}):
        want = gist_fast.gist_loss(a, p, ga, gp, n, gn, temperature=0.1, **options)
        got = gist_fast.gist_loss(a, p, ga, gp, [a, n], [ga, gn], temperature=0.1, contrast_anchors=False, **options)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        for x, y in zip(torch.autograd.grad(want, (a, p, n)), torch.autograd.grad(got, (a, p, n)), strict=True):
            torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-12)


def test_shards_and_batch_size_check():
    info = dtrain.DistInfo(rank=1, world=3)
    assert dtrain.shard_rows(info, list(range(9))) == [3, 4, 5]
    assert dtrain.shard_rows(info, list(range(8))) == [2, 3]  # a short batch loses 8 % 3 rows
    assert dtrain.shard_rows(info, [7, 8]) == []  # fewer rows than processes: the step is skipped
    assert dtrain.shard_rows(dtrain.DistInfo(), [7, 8]) == [7, 8]
    dtrain.check_batch_size(info, 12)
    with pytest.raises(ValueError, match="--batch-size 8 .* divisible by the number of processes \\(3\\)"):
        dtrain.check_batch_size(info, 8)


def test_a_batch_too_small_to_shard_is_skipped_without_an_update(setup, monkeypatch):
    """A step whose global batch has fewer rows than processes: no update, the schedule moves on."""
    p = setup
    calls = []

    def shard(info, rows):
        calls.append(len(rows))
        return [] if len(calls) == 2 else rows

    monkeypatch.setattr(dtrain, "shard_rows", shard)
    Trainer(train_config_from_args(build_parser().parse_args(_args(p, "skip")))).train()
    log = [json.loads(line) for line in (p / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 3, 4]
    assert [r["step"] for r in log if r.get("event") == "skip"] == [2]
    lr = {r["step"]: r["lr"] for r in log if "loss" in r}
    assert lr[3] == pytest.approx(2e-3 * (STEPS - 3) / (STEPS - 1))  # the scheduler stepped at step 2 too
