"""Training with GISTEmbed: GradCache steps over a guide cached on disk, Hugging Face models and data.

Modules, one job each: ``encoders`` (load / pool / save models), ``data`` (pairs and duplicate-free
batches), ``guide_cache`` (the guide's embeddings on disk), ``gradcache`` (one training step),
``checkpoint`` (atomic checkpoints), ``evaluation`` (retrieval metrics), ``trainer`` (the loop),
``config`` (options), ``defaults`` and ``stdlib_data`` (the offline default run).

Example:
    >>> from gist_fast.training import TrainConfig, Trainer
    >>> cfg = TrainConfig(student="my-student", guide="my-guide", data="pairs.jsonl", output="runs/x", max_steps=100)
    >>> Trainer(cfg).train()  # doctest: +SKIP
"""

from .config import TrainConfig
from .data import NoDuplicatesBatches, PairData, load_pairs
from .encoders import Encoder, load_encoder
from .evaluation import evaluate, retrieval_metrics
from .gradcache import LossOptions, NonFiniteLossError, gradcache_step
from .guide_cache import load_or_compute_guide
from .trainer import Trainer, TrainingInterrupted

__all__ = [
    "Encoder",
    "LossOptions",
    "NoDuplicatesBatches",
    "NonFiniteLossError",
    "PairData",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "evaluate",
    "gradcache_step",
    "load_encoder",
    "load_or_compute_guide",
    "load_pairs",
    "retrieval_metrics",
]
