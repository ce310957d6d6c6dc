"""Checkpoints and the final model: written atomically with a checksum manifest, verified when read.

Layout under the output directory::

    checkpoints/step-00000050/model/                   the student, sentence-transformers layout
    checkpoints/step-00000050/trainer_state.safetensors  optimizer / scheduler / RNG tensors
    checkpoints/step-00000050/trainer_state.json       everything else: step, settings, run identity
    checkpoints/step-00000050/gist-fast-manifest.json  size and SHA-256 of each file, written last
    checkpoints/latest                                 name of the newest checkpoint (a hint)

The trainer state holds no pickle: tensors go to safetensors and the rest to JSON, so reading a
checkpoint can never run code. A checkpoint is used only when every file matches its manifest;
:func:`latest_checkpoint` skips a damaged one (with a warning naming the file) for the previous good
one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .files import (
    MANIFEST,
    CorruptFileError,
    WriteError,
    atomic_write_bytes,
    atomic_write_text,
    follow_umask,
    fsync_directory,
    inside,
    make_directory,
    manifest_of,
    read_manifest,
    temporary_name,
    verify_manifest,
    write_manifest,
)
from .rundir import SAVING_MARKER

log = logging.getLogger("gist_fast.training")

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
LEGACY_STATE = "trainer_state.pt"  # before: a pickle, never read now
_STEP_NAME = re.compile(r"^step-\d{8}$")


def _dir(output: Path) -> Path:
    return Path(output) / "checkpoints"


# ---------------------------------------------------------------- trainer state without pickle
def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of a state dict; tensors are replaced by references into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if isinstance(obj, dict):  # keys keep their type (the optimizer's state is keyed by int)
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint's trainer state")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            if obj["__tensor__"] not in tensors:
                raise CorruptFileError(where, f"refers to a missing tensor {obj['__tensor__']!r}")
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
        if set(obj) == {"__dict__"}:
            return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["__dict__"]}
        raise CorruptFileError(where, f"unexpected object with keys {sorted(obj)}")
    return obj


def _save_state(directory: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import save as safetensors_bytes

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors)
    atomic_write_bytes(directory / STATE_TENSORS, safetensors_bytes(tensors))
    atomic_write_text(directory / STATE_JSON, json.dumps(encoded) + "\n")


def _read_state(directory: Path) -> dict[str, Any]:
    from safetensors.torch import load as safetensors_load

    try:
        tensors = safetensors_load((directory / STATE_TENSORS).read_bytes())
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged file
        raise CorruptFileError(directory / STATE_TENSORS, f"not a readable safetensors file ({e})") from None
    try:
        encoded = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(directory / STATE_JSON, f"not valid JSON ({e})") from None
    state = _decode(encoded, tensors, directory / STATE_JSON)
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "rng_cpu", "identity"} <= set(state):
        raise CorruptFileError(directory / STATE_JSON, "not a trainer state")
    return state


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(output: Path, student, optimizer, scheduler, step: int, identity: dict[str, Any]) -> Path:
    """Write a checkpoint of the state after ``step`` optimizer steps; returns its directory.

    Nothing is visible under the final name until every file and the manifest are written and
    flushed; on failure (e.g. a full disk) the partial checkpoint is removed and the earlier
    checkpoints are untouched.

    Raises:
        WriteError naming the checkpoint when a write fails.
    """
    root = make_directory(_dir(output))
    final = root / f"step-{step:08d}"
    tmp = temporary_name(final)
    try:
        os.mkdir(tmp, 0o777)
        student.save(tmp / "model")
        _save_state(
            tmp,
            {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "identity": identity,
            },
        )
        follow_umask(tmp)  # the model library may write 0o600 files
        write_manifest(tmp, manifest_of(tmp, step=step))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_directory(root)
        atomic_write_text(root / "latest", final.name + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WriteError):
            raise WriteError(final, OSError(e.errno, e.strerror.replace("cannot write ", "", 1))) from None
        raise WriteError(final, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CorruptFileError` naming the file when checkpoint ``path`` is incomplete or damaged."""
    if not (path / MANIFEST).exists() and (path / LEGACY_STATE).exists():
        raise CorruptFileError(
            path / LEGACY_STATE,
            "a pickled trainer state of an older gist-fast; it is not loaded (unpickling can run code)",
        )
    verify_manifest(path, required=(STATE_TENSORS, STATE_JSON, "model/config.json", "model/model.safetensors"))


def latest_checkpoint(output: Path) -> Path | None:
    """The newest checkpoint under ``output`` whose files all match its manifest, or None.

    A damaged or incomplete checkpoint is skipped with a warning naming the bad file. Only
    ``step-NNNNNNNN`` directories inside ``output/checkpoints`` are considered (the ``latest``
    pointer is not followed anywhere else).
    """
    root = _dir(output)
    if not root.is_dir():
        return None
    candidates = sorted(
        (p for p in root.iterdir() if _STEP_NAME.match(p.name) and p.is_dir() and inside(p, root)), reverse=True
    )
    pointer = root / "latest"
    if pointer.is_file() and not pointer.is_symlink():
        name = pointer.read_text(errors="replace").strip()
        if not _STEP_NAME.match(name) or not inside(root / name, root):
            log.warning("%s: ignoring its content %r (not a checkpoint name inside %s)", pointer, name[:80], root)
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
        except CorruptFileError as e:
            log.warning("skipping checkpoint %s: %s; trying the previous one", candidate, e)
            continue
        return candidate
    return None


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
        CorruptFileError naming the file when the checkpoint does not match its manifest.
        ValueError naming each setting that differs from the checkpoint's run (data, batch size,
        seed, number of steps, guide): resuming would not continue the same run.
    """
    verify_checkpoint(path)
    state = _read_state(path)
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


# ---------------------------------------------------------------- the final model
def save_final_model(student, output: Path) -> None:
    """Save the trained model into ``output`` (the sentence-transformers layout) without a torn state.

    The model is written to a temporary directory first; then a marker ``.gist-fast-saving`` is
    written, each file is renamed into place, the manifest (size and SHA-256 of each file) is
    written and the marker removed. A reader (:func:`~gist_fast.training.encoders.load_encoder`)
    refuses the directory while the marker is there and checks the files against the manifest.

    Raises:
        WriteError naming the file when a write fails (the earlier model stays unless the renames
        had begun, in which case the marker stays and readers refuse the directory).
    """
    output = make_directory(output)
    tmp = temporary_name(output / "model")
    try:
        os.mkdir(tmp, 0o777)
        student.save(tmp)
        follow_umask(tmp)
        manifest = manifest_of(tmp)
        try:
            old = set(read_manifest(output)["files"])
        except CorruptFileError:
            old = set()
        atomic_write_text(output / SAVING_MARKER, "a model is being saved here; readers wait for the manifest\n")
        (output / MANIFEST).unlink(missing_ok=True)
        for rel in manifest["files"]:
            make_directory((output / rel).parent)
            os.replace(tmp / rel, output / rel)
        for rel in old - set(manifest["files"]):  # files of the earlier model this one does not have
            if ".." not in Path(rel).parts:
                (output / rel).unlink(missing_ok=True)
        for d in {(output / rel).parent for rel in manifest["files"]}:
            fsync_directory(d)
        write_manifest(output, manifest)
        (output / SAVING_MARKER).unlink()
        fsync_directory(output)
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(getattr(e, "filename", None) or output, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# files of which a model directory must have at least one to have a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model", "tekken.json")


def check_model_directory(root: Path, model_dir: Path | None = None) -> None:
    """Refuse a model directory that is half-saved, damaged, or lacks its tokenizer.

    Args:
        root: the directory given (its ``.gist-fast-saving`` marker and manifest are checked).
        model_dir: the transformer's directory inside it (default ``root``): must hold a tokenizer.

    Raises:
        CorruptFileError (a ValueError) naming the file: the save was interrupted, a file does
        not match the manifest, or no tokenizer file is there (a model without its tokenizer would
        be evaluated with a fallback that maps every word to one token).
    """
    root = Path(root)
    model_dir = Path(model_dir) if model_dir is not None else root
    if (root / SAVING_MARKER).exists():
        raise CorruptFileError(
            root / SAVING_MARKER,
            "the model's save was interrupted, so the directory mixes two models; train again with --resume",
        )
    if (root / MANIFEST).exists():
        verify_manifest(root)
    present = [p.name for p in model_dir.iterdir()] if model_dir.is_dir() else []
    if not any(name in TOKENIZER_FILES or name.endswith((".model", ".tiktoken")) for name in present):
        raise CorruptFileError(
            model_dir,
            f"no tokenizer (none of {', '.join(TOKENIZER_FILES)}): an incomplete model directory",
        )
