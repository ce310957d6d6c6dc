"""What training writes and reads back: no code runs from a file, nothing leaves the run directory,
corruption is detected and named, a damaged checkpoint falls back to the previous good one, the
final model is saved atomically, a finished run is not overwritten silently, two runs do not share
an output directory, write errors are one line naming the file, temporaries of a killed run are
removed, and files follow the umask."""

import errno
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import gist_fast.training.guide_cache as guide_cache_mod
from gist_fast.cli import main
from gist_fast.training import TrainConfig, Trainer, load_encoder
from gist_fast.training.checkpoint import latest_checkpoint, save_checkpoint
from gist_fast.training.data import load_pairs
from gist_fast.training.guide_cache import load_or_compute_guide
from gist_fast.training.testing import make_tiny_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["value", "file", "path", "list", "dict", "string", "error", "module", "class", "data", "time", "name"]
LOGGER = "gist_fast.training"


def _pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b, c = (WORDS[int(j)] for j in torch.randint(0, len(WORDS), (3,), generator=g))
        rows.append({"anchor": f"{a} {b} {i}", "positive": f"the {a} of the {b} and {c} {i}"})
    return rows


@pytest.fixture
def models(tmp_path):
    make_tiny_encoder(tmp_path / "s", dropout=0.1, seed=0).save(tmp_path / "student")
    make_tiny_encoder(tmp_path / "g", hidden_size=24, seed=1, normalize=True).save(tmp_path / "guide")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(32)))
    return tmp_path


def _config(p, name, **kw):
    base = dict(
        student=str(p / "student"),
        guide=str(p / "guide"),
        data=str(p / "train.jsonl"),
        output=str(p / name),
        batch_size=8,
        mini_batch_size=4,
        max_steps=6,
        lr=1e-3,
        max_seq_length=16,
        temperature=0.05,
        save_steps=2,
        save_total_limit=0,
        progress=False,
        cache_dir=str(p / "cache"),
    )
    base.update(kw)
    return TrainConfig(**base)


def _cli_args(p, name, *extra):
    return [
        "train", "--student", str(p / "student"), "--guide", str(p / "guide"), "--data", str(p / "train.jsonl"),
        "--output", str(p / name), "--batch-size", "8", "--mini-batch-size", "4", "--max-seq-length", "16",
        "--max-steps", "6", "--save-steps", "2", "--cache-dir", str(p / "cache"), "--no-progress", *extra,
    ]  # fmt: skip


def _weights(path):
    return load_encoder(path).model.state_dict()


def _flip_byte(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def _resume_events(output):
    log = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["checkpoint"] for r in log if r.get("event") == "resume"]


class _Evil:
    """A pickle that creates a directory when it is unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _small_state(tmp_path):
    """A tiny encoder, optimizer and scheduler with one step taken (for checkpoint unit tests)."""
    enc = make_tiny_encoder(tmp_path / "tok", hidden_size=16, layers=1, seed=3)
    opt = torch.optim.AdamW(enc.model.parameters(), lr=1e-3)
    enc.model(**enc.tokenize(["a list of values"])).last_hidden_state.sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return enc, opt, sched


# ------------------------------------------------------------------ item 1: nothing read runs code
def test_a_crafted_pickle_in_a_checkpoint_or_the_cache_does_not_run(tmp_path, models, caplog):
    cfg = _config(models, "run", max_steps=4)
    Trainer(cfg).train()
    (ckpt,) = sorted((models / "run" / "checkpoints").glob("step-*"))
    marker = tmp_path / "pwned"
    torch.save(_Evil(marker), ckpt / "trainer_state.pt")  # the file the old code unpickled
    (cache,) = (models / "cache").glob("guide-*.pt")
    torch.save(_Evil(tmp_path / "pwned-cache"), cache)
    try:
        Trainer(_config(models, "run", max_steps=4, resume=True)).train()
    finally:
        assert not marker.exists(), "resuming ran code from trainer_state.pt"
        assert not (tmp_path / "pwned-cache").exists(), "reading the guide cache ran code"
    # a checkpoint whose only trainer state is that pickle (the old layout) is refused, naming it
    for name in ("trainer_state.safetensors", "trainer_state.json", "gist-fast-manifest.json"):
        (ckpt / name).unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert latest_checkpoint(models / "run") is None
    assert str(ckpt / "trainer_state.pt") in caplog.text and not marker.exists()


def test_the_latest_pointer_is_not_followed_outside_the_run(tmp_path):
    enc, opt, sched = _small_state(tmp_path)
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    save_checkpoint(out, enc, opt, sched, 2, {"seed": 1})
    save_checkpoint(elsewhere, enc, opt, sched, 9, {"seed": 1})
    (out / "checkpoints" / "latest").write_text("../../elsewhere/checkpoints/step-00000009\n")
    (out / "checkpoints" / "step-00000007").symlink_to(elsewhere / "checkpoints" / "step-00000009")
    found = latest_checkpoint(out)
    assert found == out / "checkpoints" / "step-00000002"
    assert found.resolve().is_relative_to((out / "checkpoints").resolve())


# ------------------------------------------------------------------ items 3, 4: corruption is caught
@pytest.mark.parametrize("damage", ["flip a byte of the model", "flip a byte of the state", "truncate the state"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_good_one(tmp_path, caplog, damage):
    enc, opt, sched = _small_state(tmp_path)
    out = tmp_path / "run"
    good = save_checkpoint(out, enc, opt, sched, 2, {"seed": 1})
    bad = save_checkpoint(out, enc, opt, sched, 4, {"seed": 1})
    state_files = sorted(bad.glob("trainer_state.*"), key=lambda f: f.stat().st_size)  # the tensors' file last
    if damage.endswith("model"):
        _flip_byte(bad / "model" / "model.safetensors")
        named = "model.safetensors"
    elif damage.startswith("flip"):
        for f in state_files:
            _flip_byte(f, offset_from_end=f.stat().st_size // 2)
        named = "trainer_state"
    else:
        state_files[-1].write_bytes(state_files[-1].read_bytes()[: state_files[-1].stat().st_size // 2])
        named = state_files[-1].name
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert latest_checkpoint(out) == good
    assert str(bad) in caplog.text and named in caplog.text


def test_resume_falls_back_to_the_previous_good_checkpoint_and_ends_bit_identical(models, caplog):
    cfg = _config(models, "run")
    Trainer(cfg).train()
    full = _weights(models / "run")
    step4 = models / "run" / "checkpoints" / "step-00000004"
    _flip_byte(step4 / "model" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        Trainer(_config(models, "run", resume=True)).train()
    assert "step-00000004" in caplog.text and "model.safetensors" in caplog.text
    assert _resume_events(models / "run") == [str(models / "run" / "checkpoints" / "step-00000002")]
    resumed = _weights(models / "run")
    for k in full:  # steps 3-6 replayed from step 2's state: the same weights as the run that wrote it
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


def _overwrite_one_float(path, value):
    """Change one embedding of a cache file the way a stray write would (the checksum is left as it was)."""
    stored = torch.load(path, weights_only=True)
    table = stored["table"] if isinstance(stored, dict) else stored
    table[1, 2] = value
    torch.save(stored, path)


@pytest.mark.parametrize("value", [12345.0, float("nan")])
def test_a_damaged_guide_cache_is_recomputed_and_named(tmp_path, caplog, value):
    guide = make_tiny_encoder(tmp_path / "g", hidden_size=24, seed=1)
    data = load_pairs(_pairs(20))
    first = load_or_compute_guide(guide, data, tmp_path / "c", progress=False)
    (cache,) = (tmp_path / "c").glob("guide-*.pt")
    _overwrite_one_float(cache, value)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = load_or_compute_guide(guide, data, tmp_path / "c", progress=False)
    assert torch.equal(again.table, first.table)
    assert str(cache) in caplog.text and "recomputing" in caplog.text


def test_a_damaged_guide_cache_shard_is_recomputed_and_named(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(guide_cache_mod, "SHARD_TEXTS", 16)
    guide = make_tiny_encoder(tmp_path / "g", hidden_size=24, seed=1)
    data = load_pairs(_pairs(20))  # 40 distinct texts: 3 shards
    real_encode = guide.encode
    calls = []

    def stop_in_the_third_shard(texts, **kw):
        calls.append(len(texts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(texts, **kw)

    monkeypatch.setattr(guide, "encode", stop_in_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        load_or_compute_guide(guide, data, tmp_path / "c", progress=False)
    (shard_dir,) = (tmp_path / "c").glob("guide-*.shards")
    shard = shard_dir / "shard-000001.pt"
    _overwrite_one_float(shard, 12345.0)
    calls.clear()
    monkeypatch.setattr(guide, "encode", lambda texts, **kw: (calls.append(len(texts)), real_encode(texts, **kw))[1])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        table = load_or_compute_guide(guide, data, tmp_path / "c", progress=False)
    assert sum(calls) == 40 - 16  # shard 0 was good; shard 1 (damaged) and shard 2 were computed
    assert str(shard) in caplog.text
    torch.testing.assert_close(table.table, real_encode(data.unique_texts()), rtol=1e-5, atol=1e-6)
    assert table.table.abs().max() < 100


# ------------------------------------------------------------------ item 5: the final model
def test_eval_refuses_a_model_directory_without_its_tokenizer(models, capsys):
    half = models / "half"
    half.mkdir()
    for name in ("config.json", "model.safetensors"):
        (half / name).write_bytes((models / "student" / name).read_bytes())
    assert main(["eval", "--model", str(half), "--data", str(models / "train.jsonl"), "--json"]) == 2
    err = capsys.readouterr().err
    assert str(half) in err and "tokenizer" in err and "vocab.txt" in err
    assert "Traceback" not in err


def test_an_interrupted_final_save_leaves_no_model_that_eval_accepts(models, monkeypatch, capsys):
    from gist_fast.training.encoders import Encoder

    out = models / "run"
    real_save = Encoder.save

    def killed_while_saving_the_final_model(self, path):
        path = type(out)(path)
        if path == out or path.parent == out:  # the final model (not a checkpoint's)
            path.mkdir(parents=True, exist_ok=True)
            self.model.save_pretrained(path, safe_serialization=True)  # weights and config.json, no tokenizer
            raise KeyboardInterrupt
        real_save(self, path)

    monkeypatch.setattr(Encoder, "save", killed_while_saving_the_final_model)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_config(models, "run", max_steps=2)).train()
    monkeypatch.setattr(Encoder, "save", real_save)
    assert main(["eval", "--model", str(out), "--data", str(models / "train.jsonl"), "--json"]) == 2
    assert str(out) in capsys.readouterr().err
    # the run completes with --resume, and then its model is whole and checked against its manifest
    Trainer(_config(models, "run", max_steps=2, resume=True)).train()
    assert main(["eval", "--model", str(out), "--data", str(models / "train.jsonl"), "--json"]) == 0
    capsys.readouterr()
    _flip_byte(out / "model.safetensors")
    assert main(["eval", "--model", str(out), "--data", str(models / "train.jsonl"), "--json"]) == 2
    err = capsys.readouterr().err
    assert str(out / "model.safetensors") in err and "checksum" in err


# ------------------------------------------------------------------ item 6: one run per output
def test_a_finished_run_is_not_overwritten_without_overwrite(models, capsys):
    assert main(_cli_args(models, "run")) == 0
    before = (models / "run" / "model.safetensors").read_bytes()
    assert main(_cli_args(models, "run", "--seed", "7")) == 2
    err = capsys.readouterr().err
    assert str(models / "run") in err and "--overwrite" in err and "--resume" in err
    assert (models / "run" / "model.safetensors").read_bytes() == before
    assert main(_cli_args(models, "run", "--seed", "7", "--overwrite")) == 0
    log = [json.loads(line) for line in (models / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log if r.get("event") == "start"] == ["start"]  # one run's log, not two
    assert {r["config"]["seed"] for r in log if r.get("event") == "start"} == {7}
    assert (models / "run" / "model.safetensors").read_bytes() != before


def test_a_second_run_on_the_same_output_is_refused_while_the_first_holds_it(models):
    out = models / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n",
            str(out / ".gist-fast.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"{out}.*pid {holder.pid}"):
            Trainer(_config(models, "run", max_steps=2)).train()
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock file stays, and blocks nothing
    assert (out / ".gist-fast.lock").exists()
    assert Trainer(_config(models, "run", max_steps=2)).train()["steps"] == 2


# ------------------------------------------------------------------ item 8: write errors
def test_disk_full_while_writing_a_checkpoint_is_one_line_and_keeps_the_previous_one(models, monkeypatch, capsys):
    real_fsync = os.fsync

    def disk_full_on_the_second_trainer_state(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if "trainer_state" in name and "step-00000004" in name:  # step 2's state is whole; step 4's runs out
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_on_the_second_trainer_state)
    assert main(_cli_args(models, "run")) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "No space left on device" in err and str(models / "run" / "checkpoints" / "step-00000004") in err
    monkeypatch.setattr(os, "fsync", real_fsync)
    ckpts = models / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000002"]  # nothing half-written
    assert latest_checkpoint(models / "run") == ckpts / "step-00000002"  # intact: it passes its checksums


def _refuse_writes_under(monkeypatch, root):
    """Make ``root`` behave like a read-only directory (the tests may run as root, which chmod cannot stop)."""
    import builtins
    import io

    root = str(root)

    def under(path):
        return os.path.abspath(os.fspath(path)).startswith(root)

    def ro(path):
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *a, **kw):
        if isinstance(file, (str, os.PathLike)) and under(file) and any(c in mode for c in "wax+"):
            raise ro(file)
        return real_open(file, mode, *a, **kw)

    def fake_os_open(path, flags, *a, **kw):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise ro(path)
        return real_os_open(path, flags, *a, **kw)

    def fake_mkdir(path, *a, **kw):
        if under(path):
            if os.path.exists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
            raise ro(path)
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def test_a_read_only_output_directory_is_one_line_naming_it(models, monkeypatch, capsys):
    out = models / "run"
    out.mkdir()
    if os.geteuid() == 0:
        _refuse_writes_under(monkeypatch, out)
    else:
        out.chmod(0o555)
    try:
        assert main(_cli_args(models, "run")) == 2
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert str(out) in err and ("Read-only" in err or "Permission denied" in err)


def test_temporaries_of_a_killed_run_are_removed_at_the_next_start(models):
    from gist_fast.training.files import temporary_name

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out, cache = models / "run", models / "cache"
    (out / "checkpoints").mkdir(parents=True)
    cache.mkdir()
    (temporary_name(out / "checkpoints" / "step-00000002", pid=dead.pid) / "model").mkdir(parents=True)
    temporary_name(out / "results.json", pid=dead.pid).write_text("{")
    temporary_name(cache / "guide-0123.pt", pid=dead.pid).write_bytes(b"half")
    (out / "checkpoints" / ".latest.k3j_x9q2.tmp").write_text("step-")  # the old code's names
    alive = temporary_name(out / "results.json")  # a live writer's (this process)
    alive.write_text("{")
    other_host = out / f".results.json.elsewhere-{dead.pid}-0123456789abcdef.gist-fast.tmp"
    other_host.write_text("{")  # its pid means nothing here
    theirs = out / "notes.tmp"  # not ours
    theirs.write_text("keep")
    (out / "checkpoints" / "keep.tmp").write_text("keep")
    Trainer(_config(models, "run", max_steps=2)).train()
    left = sorted(p.name for d in (out, out / "checkpoints", cache) for p in d.iterdir() if "tmp" in p.name)
    assert left == sorted(["keep.tmp", "notes.tmp", alive.name, other_host.name])


# ------------------------------------------------------------------ item 12: modes follow the umask
def test_output_files_follow_the_umask(models):
    old = os.umask(0o022)
    try:
        Trainer(_config(models, "run", max_steps=3, eval_data=str(models / "train.jsonl"))).train()
    finally:
        os.umask(old)
    written = [p for d in (models / "run", models / "cache") for p in d.rglob("*")]
    assert any(p.name == "results.json" for p in written) and any(p.name == "latest" for p in written)
    wrong = {str(p): oct(p.stat().st_mode & 0o777) for p in written if p.stat().st_mode & 0o777 not in (0o644, 0o755)}
    assert not wrong


def test_atomic_write_bytes_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import gist_fast.training.files as files_mod

    target = tmp_path / "x.bin"
    files_mod.atomic_write_bytes(target, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(files_mod.WriteError, match=rf"{target}: No space left on device"):
        files_mod.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
