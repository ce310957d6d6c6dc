"""Bad input gets a ValueError or TypeError that names the argument, never a wrong number."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import gist_fast
from gist_fast.inputs import GISTOptions

B, D, DG = 4, 6, 5


def good(**overrides):
    """Valid arguments of gist_loss, with `overrides` replacing some of them."""
    args = {
        "anchor": torch.randn(B, D),
        "positive": torch.randn(B, D),
        "guide_anchor": torch.randn(B, DG),
        "guide_positive": torch.randn(B, DG),
        "negatives": torch.randn(B, D),
        "guide_negatives": torch.randn(B, DG),
    }
    args.update(overrides)
    return args


def call(backend="reference", **overrides):
    options = {key: overrides.pop(key) for key in list(overrides) if key not in good()}
    return gist_fast.gist_loss(**good(**overrides), backend=backend, **options)


def test_valid_call_works():
    assert torch.isfinite(call())


BAD_INPUTS = [
    # (overrides, exception, words the message must contain)
    ({"positive": torch.randn(B + 1, D)}, ValueError, ["positive", "rows"]),
    ({"positive": torch.randn(B, D + 1)}, ValueError, ["positive", "dimension"]),
    ({"negatives": torch.randn(B, D + 2)}, ValueError, ["negatives[0]", "dimension"]),
    ({"negatives": torch.randn(B - 1, D)}, ValueError, ["negatives[0]", "rows"]),
    ({"guide_positive": torch.randn(B, DG + 1)}, ValueError, ["guide_positive", "dimension"]),
    ({"guide_anchor": torch.randn(B + 1, DG)}, ValueError, ["guide"]),
    ({"guide_negatives": torch.randn(B - 1, DG)}, ValueError, ["guide_negatives[0]", "rows"]),
    ({"guide_negatives": None}, ValueError, ["negatives", "guide_negatives", "1", "0"]),
    ({"guide_negatives": torch.randn(2, B, DG)}, ValueError, ["negatives", "guide_negatives", "2"]),
    ({"anchor": torch.randn(0, D), "positive": torch.randn(0, D)}, ValueError, ["anchor", "empty"]),
    ({"anchor": torch.randint(0, 5, (B, D))}, TypeError, ["anchor", "floating"]),
    ({"guide_positive": torch.ones(B, DG, dtype=torch.bool)}, TypeError, ["guide_positive", "floating"]),
    ({"anchor": torch.randn(B, D, 2)}, ValueError, ["anchor", "2-D"]),
    ({"anchor": [[1.0] * D] * B}, TypeError, ["anchor", "Tensor"]),
    ({"negatives": torch.randn(2, 2, B, D)}, ValueError, ["negatives", "shape"]),
    ({"negatives": "text"}, TypeError, ["negatives"]),
    ({"negatives": [torch.randn(B, D), 3]}, TypeError, ["negatives[1]"]),
    ({"anchor": torch.randn(B, D).to("meta")}, ValueError, ["device"]),
    ({"temperature": 0.0}, ValueError, ["temperature"]),
    ({"temperature": -0.1}, ValueError, ["temperature"]),
    ({"temperature": math.inf}, ValueError, ["temperature"]),
    ({"temperature": math.nan}, ValueError, ["temperature"]),
    ({"temperature": "0.1"}, TypeError, ["temperature"]),
    ({"margin": math.nan}, ValueError, ["margin"]),
    ({"margin_strategy": "percent"}, ValueError, ["margin_strategy", "percent"]),
    ({"reduction": "max"}, ValueError, ["reduction", "max"]),
    ({"contrast_anchors": "yes"}, TypeError, ["contrast_anchors"]),
]


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
@pytest.mark.parametrize("overrides, error, words", BAD_INPUTS, ids=lambda x: None)
def test_bad_input_is_named(backend, overrides, error, words):
    with pytest.raises(error) as info:
        call(backend=backend, **overrides)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.parametrize(
    "name", ["anchor", "positive", "guide_anchor", "guide_positive", "negatives", "guide_negatives"]
)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_embeddings_are_named(name, bad):
    args = good()
    args[name] = args[name].clone()
    args[name][1, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf") as info:
        gist_fast.gist_loss(**args, backend="torch")
    assert name in str(info.value)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend.*'nope'"):
        call(backend="nope")


def test_devices_must_agree_for_guides_too():
    with pytest.raises(ValueError, match="guide_negatives.*device"):
        call(guide_negatives=torch.randn(B, DG, device="meta"))


def test_half_precision_and_mixed_dtypes_are_accepted():
    args = good(anchor=torch.randn(B, D, dtype=torch.bfloat16), guide_anchor=torch.randn(B, DG, dtype=torch.float16))
    loss = gist_fast.gist_loss(**args, backend="torch")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_missing_train_extra_names_the_package_and_the_install_command(tmp_path, monkeypatch):
    """Without the train extra, reading data that needs it (parquet; JSON lines and CSV are read
    without it) fails with the package to install, not a bare ModuleNotFoundError."""
    from gist_fast.training.data import _load_dataset

    data = tmp_path / "train.parquet"
    data.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    install = r"train\.parquet needs the package 'datasets': pip install 'gist-fast\[train\]'"
    with pytest.raises(ImportError, match=install):
        _load_dataset(str(data), "train")


def test_without_triton_auto_takes_torch_and_triton_names_the_package(monkeypatch):
    """torch's CUDA builds also run where Triton is not installed: "auto" then takes the tiled
    torch backend on CUDA tensors, and an explicit Triton backend says what is missing."""
    from types import SimpleNamespace

    from gist_fast import backends

    on_cuda = SimpleNamespace(
        anchor=SimpleNamespace(device=torch.device("cuda")), batch_size=8, num_candidates=8, negatives=()
    )
    assert backends.auto_backend(on_cuda) == ("triton" if backends._triton_installed() else "torch")
    if backends._triton_installed():  # a Matryoshka loss takes the plan with the one-pass path
        assert backends.auto_backend(on_cuda, GISTOptions(matryoshka_dims=(4, 8))) == "triton_chunked"
        assert backends.auto_backend(on_cuda, GISTOptions()) == "triton"
    monkeypatch.setattr(backends, "_triton_installed", lambda: False)
    assert backends.auto_backend(on_cuda) == "torch"
    for name in ("triton", "triton_chunked"):
        with pytest.raises(ValueError, match=f"backend='{name}' needs the package triton"):
            call(backend=name)
    assert torch.isfinite(call(backend="auto"))  # on the CPU: torch, as before
