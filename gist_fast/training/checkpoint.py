"""Checkpoints written atomically (a temporary directory, then a rename) and read back for --resume.

Layout under the output directory::

    checkpoints/step-00000050/model/             the student, sentence-transformers layout
    checkpoints/step-00000050/trainer_state.pt   step, optimizer, scheduler, RNG states, run identity
    checkpoints/latest                           name of the newest complete checkpoint
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

STATE = "trainer_state.pt"


def _dir(output: Path) -> Path:
    return Path(output) / "checkpoints"


def save_checkpoint(output: Path, student, optimizer, scheduler, step: int, identity: dict[str, Any]) -> Path:
    """Write a checkpoint of the state after ``step`` optimizer steps; returns its directory.

    Nothing is visible under the final name until every file is written and flushed.
    """
    root = _dir(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        student.save(tmp / "model")
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "identity": identity,
        }
        with open(tmp / STATE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fd, tmp_latest = tempfile.mkstemp(prefix=".latest.", suffix=".tmp", dir=root)
    with os.fdopen(fd, "w") as f:
        f.write(final.name + "\n")
    os.replace(tmp_latest, root / "latest")
    return final


def latest_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint under ``output``, or None."""
    root = _dir(output)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE).is_file():
            return candidate
    done = sorted(p for p in root.glob("step-*") if (p / STATE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def prune_checkpoints(output: Path, limit: int, keep: Path) -> None:
    """Delete all but the newest ``limit`` checkpoints (never ``keep``); ``limit`` <= 0 keeps all."""
    if limit <= 0:
        return
    done = sorted(p for p in _dir(output).glob("step-*") if p.is_dir())
    for old in done[:-limit]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_state(path: Path, optimizer, scheduler, identity: dict[str, Any], device: torch.device) -> int:
    """Restore optimizer, scheduler and RNG states from checkpoint ``path``; returns its step.

    Raises:
        ValueError naming each setting that differs from the checkpoint's run (data, batch size,
        seed, number of steps, guide): resuming would not continue the same run.
    """
    state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    differ = [
        f"{k}: checkpoint {state['identity'].get(k)!r}, now {v!r}"
        for k, v in identity.items()
        if state["identity"].get(k) != v
    ]
    if differ:
        raise ValueError(f"cannot resume from {path}: the run differs ({'; '.join(differ)})")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"])
