"""`gist-fast train` on CUDA: the device-agnostic plumbing on the CPU, the GPU itself where there is one.

CPU (always): the step's phase times and the guide cache's time in metrics.jsonl, inference batches
sorted by token length (not characters), the GPU batch rule of the guide cache.
CUDA only (skipped here; run by benchmarks/gpu_session.sh): a few bf16 steps with the Triton loss,
the peak memory in the log, no host synchronisation in the GradCache loops beyond the one read of
the loss, pinned guide rows, and a resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch

from gist_fast.training import TrainConfig, Trainer, TrainingInterrupted, load_encoder
from gist_fast.training.gradcache import StepPhases, gradcache_step
from gist_fast.training.testing import make_tiny_encoder
from gist_fast.training.trainer import GPU_GUIDE_BATCH_SIZE, gpu_peak, guide_batch_size

ON_GPU = torch.cuda.is_available()
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read at first use)
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
WORDS = ["value", "file", "path", "list", "dict", "string", "error", "module", "class", "data", "time", "name"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b, c = (WORDS[int(j)] for j in torch.randint(0, len(WORDS), (3,), generator=g))
        rows.append({"anchor": f"{a} {b} {i}", "positive": f"the {a} of the {b} and {c} {i}"})
    return rows


@pytest.fixture
def models(tmp_path):
    student = make_tiny_encoder(tmp_path / "s", dropout=0.1, seed=0)
    student.save(tmp_path / "student")
    guide = make_tiny_encoder(tmp_path / "g", hidden_size=24, seed=1, normalize=True)
    guide.save(tmp_path / "guide")
    return str(tmp_path / "student"), str(tmp_path / "guide")


def _config(tmp_path, models, name, **kw):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in _pairs(40)))
    base = dict(
        student=models[0],
        guide=models[1],
        data=str(data),
        output=str(tmp_path / name),
        batch_size=8,
        mini_batch_size=5,
        max_steps=4,
        lr=1e-3,
        max_seq_length=16,
        temperature=0.05,
        save_steps=2,
        progress=False,
        cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return TrainConfig(**base)


def _log(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- CPU
def test_metrics_log_has_the_step_split_and_the_guide_cache_time(tmp_path, models):
    Trainer(_config(tmp_path, models, "run")).train()
    log = _log(tmp_path / "run")
    (cache,) = [r for r in log if r.get("event") == "guide_cache"]
    assert cache["texts"] == 80 and cache["seconds"] > 0 and "gpu_peak_mb" not in cache  # CPU: no GPU figure
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 4
    for r in steps:
        assert set(r["phase_s"]) == {"tokenize", "encode", "loss", "reencode"}
        assert all(s > 0 for s in r["phase_s"].values())
        assert sum(r["phase_s"].values()) <= r["step_s"] + 1e-3  # the phases are parts of the step
        assert "gpu_peak_mb" not in r and math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])


def test_step_phases_are_empty_until_every_boundary_is_marked():
    phases = StepPhases(torch.device("cpu"))
    for _ in range(4):
        phases.mark()
    assert phases.seconds() == {}
    phases.mark()
    assert list(phases.seconds()) == ["tokenize", "encode", "loss", "reencode"]


def test_gradcache_returns_the_loss_on_the_host(tmp_path):
    enc = make_tiny_encoder(tmp_path)
    texts = [[f"{w} {i}" for i, w in enumerate(WORDS[:6])], [f"the {w} {i}" for i, w in enumerate(WORDS[6:])]]
    g = torch.Generator().manual_seed(0)
    guide = [torch.randn(6, 8, generator=g) for _ in range(2)]
    loss = gradcache_step(enc, texts, guide, mini_batch_size=4)
    assert loss.device.type == "cpu" and loss.dtype == torch.float32 and not loss.requires_grad


def test_encode_batches_are_sorted_by_token_length_not_characters(tmp_path):
    enc = make_tiny_encoder(tmp_path, max_seq_length=32)
    # long in characters but few tokens (vocabulary words), short in characters but many (spelt out)
    texts = ["file file file file file", "qzxqzxqzx", "value value value value", "xq", "data", "zqzqzqzq"]
    tokens = [len(enc.tokenizer(t)["input_ids"]) for t in texts]
    widths = []
    real_forward = type(enc).forward

    def recording(self, feats):
        widths.append((feats["input_ids"].shape[0], feats["input_ids"].shape[1]))
        return real_forward(self, feats)

    type(enc).forward = recording
    try:
        out = enc.encode(texts, batch_size=2)
    finally:
        type(enc).forward = real_forward
    ranked = sorted(tokens, reverse=True)
    assert widths == [(2, ranked[0]), (2, ranked[2]), (2, ranked[4])]  # the least padding there is
    alone = torch.cat([enc.encode([t]) for t in texts])
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-6)  # rows land where they belong
    assert enc.encode([]).shape == (0, enc.dim)
    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        enc.encode(texts, batch_size=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("texts", [["value of the file", "a", "list dict string error module"], ["file", "data"]])
def test_the_mask_reaches_the_model_ready_so_transformers_need_not_inspect_it(tmp_path, monkeypatch, texts, device):
    """transformers checks a 2D mask for padding on the device (a host sync per mini-batch on CUDA);
    the encoder answers that on the host: a ready SDPA mask when padded, none when not. Same output."""
    import transformers.masking_utils as masking

    from gist_fast.training.encoders import pool, takes_prepared_mask

    enc = make_tiny_encoder(tmp_path, dropout=0.0).to(device).eval()
    assert takes_prepared_mask(enc.model)
    feats = enc.tokenize(texts)
    with torch.no_grad():
        on_device = {k: v.to(device) for k, v in feats.items()}
        hidden = enc.model(**on_device, return_dict=True).last_hidden_state  # the usual 2D-mask path
        want = pool(hidden, on_device["attention_mask"], enc.pooling)
        inspected = []
        real = masking._ignore_bidirectional_mask_sdpa

        def inspecting(padding_mask, *args, **kwargs):  # a mask to test on the device: the sync
            inspected.extend([] if padding_mask is None else [padding_mask.shape])
            return real(padding_mask, *args, **kwargs)

        monkeypatch.setattr(masking, "_ignore_bidirectional_mask_sdpa", inspecting)
        got = enc(feats)
    assert inspected == []
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if device == "cpu" else 1e-5)
    enc.model.config._attn_implementation = "eager"  # eager attention adds the mask: it keeps the 2D one
    assert not takes_prepared_mask(enc.model)


def test_guide_cache_batches_on_the_gpu_are_large_unless_chosen():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert guide_batch_size(TrainConfig(), cuda) == GPU_GUIDE_BATCH_SIZE
    assert guide_batch_size(TrainConfig(), cpu) == 64
    assert guide_batch_size(TrainConfig(guide_batch_size=200), cuda) == 200
    assert gpu_peak(cpu) == {}


# ------------------------------------------------------------------------------------------ CUDA
@needs_cuda
def test_cuda_steps_bf16_triton_log_the_peak_memory(tmp_path, models, monkeypatch):
    import gist_fast.backends as backends

    chosen = []
    real_auto = backends.auto_backend
    monkeypatch.setattr(backends, "auto_backend", lambda inputs: chosen.append(real_auto(inputs)) or chosen[-1])
    cfg = _config(tmp_path, models, "gpu", device="cuda", max_steps=3, save_steps=0)
    trainer = Trainer(cfg)
    assert trainer.autocast_dtype == torch.bfloat16  # bf16 "auto" is on for CUDA
    trainer.train()
    assert chosen and set(chosen) <= {"triton", "triton_chunked"}, chosen  # "auto": a Triton plan on CUDA
    log = _log(tmp_path / "gpu")
    start = next(r for r in log if r.get("event") == "start")
    assert start["config"]["loss_backend"] == "auto"
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) for r in steps)
    assert all(r["gpu_peak_mb"] > 0 for r in steps)
    assert next(r for r in log if r.get("event") == "guide_cache")["gpu_peak_mb"] > 0
    assert all(set(r["phase_s"]) == {"tokenize", "encode", "loss", "reencode"} for r in steps)
    (cache,) = (tmp_path / "cache").glob("guide-*.pt")
    assert torch.load(cache, weights_only=True)["table"].dtype == torch.bfloat16


@needs_cuda
def test_gradcache_loops_do_not_wait_for_the_gpu(tmp_path):
    """The one host synchronisation of a step inside gradcache_step is the read of the loss."""
    enc = make_tiny_encoder(tmp_path, dropout=0.1).to("cuda").train()
    texts = [[f"{w} {i} " * (1 + i % 4) for i in range(24) for w in WORDS[:1]] for _ in range(2)]
    texts[1] = [t + " and the data" for t in texts[1]]
    g = torch.Generator(device="cuda").manual_seed(0)
    guide = [torch.randn(24, 16, device="cuda", generator=g) for _ in range(2)]
    gradcache_step(enc, texts, guide, mini_batch_size=4, autocast_dtype=torch.bfloat16)  # warm-up
    torch.cuda.synchronize()
    ours = ("gist_fast" + os.sep + "training",)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            gradcache_step(enc, texts, guide, mini_batch_size=4, autocast_dtype=torch.bfloat16)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = [f"{w.filename}:{w.lineno}" for w in syncs]
    in_ours = [x for x in where if any(p in x for p in ours)]
    assert len(in_ours) == 1 and "gradcache.py" in in_ours[0], where  # loss.item(); 12 mini-batches
    assert not [x for x in where if "masking_utils" in x], where  # the mask went in ready (no .all())


@needs_cuda
def test_guide_rows_reach_the_gpu_from_pinned_memory(tmp_path):
    from gist_fast.training.data import load_pairs
    from gist_fast.training.guide_cache import load_or_compute_guide

    guide = make_tiny_encoder(tmp_path / "g", hidden_size=24, seed=1).to("cuda")
    data = load_pairs(_pairs(30))
    table = load_or_compute_guide(guide, data, tmp_path / "c", progress=False)
    rows = [3, 1, 29]
    got = table.batch(rows, torch.device("cuda"))
    want = table.batch(rows, torch.device("cpu"))
    for a, b in zip(got, want, strict=True):
        assert a.device.type == "cuda"
        assert torch.equal(a.cpu(), b)
    on_cpu = load_or_compute_guide(guide.to("cpu"), data, tmp_path / "c2", progress=False)
    torch.testing.assert_close(table.table, on_cpu.table, rtol=2e-3, atol=2e-4)  # GPU vs CPU fp32 guide


@pytest.fixture
def deterministic():
    """Deterministic CUDA kernels (embedding backward without atomics) and the math attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without one warns (listed on failure)
    try:
        with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_resume_is_bit_identical(tmp_path, models, deterministic, device):
    Trainer(_config(tmp_path, models, "full", device=device, max_steps=6)).train()

    def ctrl_c_after_step_3(trainer, pos, loss):
        if pos.step + 1 == 3:
            trainer._stop_requested = True  # what Ctrl-C's handler sets (no signal: safe under xdist)

    with pytest.raises(TrainingInterrupted):
        Trainer(_config(tmp_path, models, "cut", device=device, max_steps=6), callbacks=[ctrl_c_after_step_3]).train()
    Trainer(_config(tmp_path, models, "cut", device=device, max_steps=6, resume=True)).train()
    full, resumed = (load_encoder(tmp_path / n).model.state_dict() for n in ("full", "cut"))
    moved = load_encoder(models[0]).model.state_dict()
    assert any(not torch.equal(full[k], moved[k]) for k in full)
    nondeterministic = sorted({str(w.message)[:160] for w in deterministic if "deterministic" in str(w.message)})
    losses = [[r["loss"] for r in _log(tmp_path / n) if "loss" in r] for n in ("full", "cut")]
    assert losses[0] == losses[1], nondeterministic
    for k in full:  # bit-identical: same data order, RNG, optimizer state
        assert torch.equal(resumed[k], full[k]), (k, nondeterministic)
