"""The training loop: data, cached guide, GradCache steps, AdamW, checkpoints, resume, evaluation."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import distributed as dtrain
from .checkpoint import latest_checkpoint, load_state, prune_checkpoints, save_checkpoint, save_final_model
from .config import TrainConfig
from .data import BatchSchedule, NoDuplicatesBatches, PairData, load_pairs
from .encoders import Encoder, enable_checkpointing, load_encoder
from .evaluation import evaluate, format_dim_metrics, format_metrics
from .files import WriteError, atomic_write_text
from .gradcache import LossOptions, NonFiniteLossError, StepPhases, gradcache_step
from .guide_cache import load_or_compute_guide
from .matryoshka import RecordingDims, check_dims_fit, embedding_dim
from .rundir import RunLock, prepare_run_directory
from .tokens import TokenCache


class TrainingInterrupted(Exception):
    """Ctrl-C stopped training after a checkpoint was written (``checkpoint``; resume with ``--resume``)."""

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


GPU_GUIDE_BATCH_SIZE = 1024


def guide_batch_size(config: TrainConfig, device: torch.device) -> int:
    """Texts per guide forward pass when filling the cache: ``config.guide_batch_size``, except that on
    CUDA the default (64) becomes ``GPU_GUIDE_BATCH_SIZE`` (inference without grad holds no
    activations for backward, and large batches keep the GPU busy); any other value is kept."""
    if device.type == "cuda" and config.guide_batch_size == TrainConfig.guide_batch_size:
        return GPU_GUIDE_BATCH_SIZE
    return config.guide_batch_size


def reset_gpu_peak(device: torch.device) -> None:
    """Start a new peak-memory window on a CUDA ``device`` (nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak(device: torch.device) -> dict[str, float]:
    """``{"gpu_peak_mb": ...}``: ``torch.cuda.max_memory_allocated`` since the last reset, in MiB, on
    CUDA; ``{}`` elsewhere (a host-side counter: reading it does not wait for the GPU)."""
    if device.type != "cuda":
        return {}
    return {"gpu_peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor: linear warmup over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class _NullLog:
    """The metrics log of ranks other than 0 (only rank 0 writes files)."""

    def write(self, **record: Any) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLog:
    """Append-only JSONL log, one flushed line per event."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        try:
            self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise WriteError(path, e) from None

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        try:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        except OSError as e:  # disk full: one line naming the log, not a traceback
            raise WriteError(self.path, e) from None

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as e:
            raise WriteError(self.path, e) from None


class Trainer:
    """Train a student embedding model with GISTEmbed, GradCache and a guide cached on disk.

    Args:
        config: a :class:`TrainConfig`.
        student / guide: optional in-memory models (an :class:`Encoder`, a ``SentenceTransformer``
            or ``(model, tokenizer)``) used instead of ``config.student`` / ``config.guide``.
        train_data / eval_data: optional in-memory :class:`PairData` instead of the config's paths.
        callbacks: functions ``f(trainer, position, loss)`` called after every optimizer step.

    Example:
        >>> cfg = TrainConfig(student="my-student", guide="my-guide", data="pairs.jsonl", output="runs/x", epochs=1)
        >>> Trainer(cfg).train()  # doctest: +SKIP
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        student: Any = None,
        guide: Any = None,
        train_data: PairData | None = None,
        eval_data: PairData | None = None,
        callbacks: list[Callable] | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.output = Path(config.output)
        self._student_in = student
        self._guide_in = guide
        self._train_in = train_data
        self._eval_in = eval_data
        self.callbacks = list(callbacks or [])
        # under torchrun: join the process group, one device per process (see distributed.py)
        self.dist, device_name = dtrain.setup(config.device)
        dtrain.check_batch_size(self.dist, config.batch_size)
        self.device = resolve_device(device_name)
        use_bf16 = config.bf16 == "on" or (config.bf16 == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.student: Encoder | None = None
        self.results: dict[str, Any] = {}
        self._stop_requested = False
        self._sampler: NoDuplicatesBatches | None = None

    # ----------------------------------------------------------------- setup
    def _say(self, msg: str) -> None:
        if self.config.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            tqdm.write(msg)

    def _prepare_defaults(self) -> tuple[Any, Any, Any, Any]:
        """Resolve the default run's guide, student and data (built under ``output`` when missing)."""
        from .defaults import default_guide_path, make_default_student

        cfg = self.config
        guide = self._guide_in if self._guide_in is not None else (cfg.guide or default_guide_path())
        student = self._student_in
        if student is None:
            student = cfg.student
            if student is None:
                if not isinstance(guide, str):
                    raise ValueError("the default student is derived from a guide directory; pass --student")
                student = make_default_student(guide, self.output / "student-init")
                self._say(f"student: the first 2 layers of {guide} (saved in {student})")
        train, held = self._train_in, self._eval_in
        if train is None and cfg.data is None:
            from .stdlib_data import write_stdlib_splits

            if self.dist.is_main:
                train_path, eval_path = write_stdlib_splits(self.output / "data")
            else:  # rank 0 wrote them before the other ranks got here (see train)
                train_path, eval_path = self.output / "data" / "train.jsonl", self.output / "data" / "eval.jsonl"
            self._say(f"data: standard-library docstrings -> {train_path} and {eval_path} (held out)")
            train = str(train_path)
            if held is None and cfg.eval_data is None:
                held = str(eval_path)
        return student, guide, train if train is not None else cfg.data, held if held is not None else cfg.eval_data

    def _load_data(self, source: Any, what: str, limit: int | None = None) -> PairData:
        if isinstance(source, PairData):
            return source
        cfg = self.config
        return load_pairs(
            source,
            anchor_column=cfg.anchor_column,
            positive_column=cfg.positive_column,
            negative_columns=cfg.negative_columns,
            split=cfg.data_split if what == "train" else "test",
            limit=limit,
        )

    def _preflight(self) -> None:
        """Everything that can be checked before a file is written (see ``preflight.py``): the loss
        backend, the models' token limits, the data (loaded here and kept for the run) and whether it
        can train at all; so a run that fails here leaves nothing behind."""
        from . import preflight

        cfg = self.config
        preflight.check_backend(cfg.loss_backend, cfg.label("loss_backend"))
        guide, guide_label = self._guide_in, "guide"
        if guide is None:
            from .defaults import default_guide_path

            guide = cfg.guide if cfg.guide is not None else default_guide_path()
        preflight.check_seq_length(
            guide, cfg.label("guide"), cfg.guide_max_seq_length, cfg.label("guide_max_seq_length")
        )
        student = self._student_in if self._student_in is not None else cfg.student
        if student is not None:
            guide, guide_label = student, "student"  # else the default student: the guide's first layers
        preflight.check_seq_length(guide, cfg.label(guide_label), cfg.max_seq_length, cfg.label("max_seq_length"))
        if cfg.matryoshka_dims is not None:  # sizes up to the student's (the default one: the guide's) embedding dim
            named = isinstance(guide, (str, Path))
            check_dims_fit(
                cfg.matryoshka_dims,
                embedding_dim(preflight.model_config(guide, cfg.label(guide_label)) if named else guide),
                cfg.label("matryoshka_dims"),
                ("the student " if guide_label == "student" else "the default student, from the guide ")
                + (str(guide) if named else f"(in memory, a {type(guide).__name__})"),
            )
        if self._train_in is None and cfg.data is not None:
            self._train_in = self._load_data(cfg.data, "train", cfg.max_train_rows)
        if self._eval_in is None and cfg.eval_data is not None:
            self._eval_in = self._load_data(cfg.eval_data, "eval")
        if self._train_in is not None:
            self._check_trainable(self._train_in)

    def _check_trainable(self, train: PairData) -> None:
        """Build the batch sampler (every batch at least 2 rows, and one per process); refuse data
        that forms no batch, warn when rows are left out."""
        from . import preflight

        cfg = self.config
        min_rows = max(2, self.dist.world)
        self._sampler = NoDuplicatesBatches(
            train, cfg.batch_size, seed=cfg.seed, drop_last=cfg.drop_last, min_rows=min_rows
        )
        for message in preflight.check_trainable(train, self._sampler, cfg.label("data")):
            self.results.setdefault("warnings", []).append(message)
            if self.dist.is_main:
                print(f"gist-fast: warning: {message}", file=sys.stderr)

    # ------------------------------------------------------------- training
    def train(self) -> dict[str, Any]:
        """Run training to the end (or to Ctrl-C / a non-finite loss); returns metrics and paths.

        Raises:
            NonFiniteLossError: a NaN or Inf loss or gradient; the model is not updated by that step
                and the checkpoints on disk are kept.
            TrainingInterrupted: Ctrl-C; a checkpoint of the last finished step was written first.
            ValueError: ``output`` holds an earlier run and neither ``resume`` nor ``overwrite`` is
                set, or another run holds its lock (:class:`~gist_fast.training.rundir.RunDirectoryBusy`).
            WriteError: a file could not be written (disk full, read-only directory); it names the file.
        """
        self._preflight()  # checks, and loads the data, before anything is written
        # one run at a time per output directory (rank 0 writes every file; the lock is its)
        lock = RunLock(self.output) if self.dist.is_main else None
        try:
            if lock is not None:
                prepare_run_directory(self.output, resume=self.config.resume, overwrite=self.config.overwrite)
            return self._train()
        finally:
            if lock is not None:
                lock.release()

    def _train(self) -> dict[str, Any]:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif self.device.type == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1):
            # every core is already busy: more threads than free cores slow each matmul down (2-3x seen)
            torch.set_num_threads(1)
            self._say(f"the CPU is busy (load {os.getloadavg()[0]:.1f}): using 1 thread (set --threads to override)")
        torch.manual_seed(cfg.seed)
        info = self.dist
        progress = cfg.progress and info.is_main  # bars and messages on rank 0 only
        # rank 0 writes the default student and data first; the other ranks then read them
        if not info.is_main:
            dtrain.barrier(info)
        student_src, guide_src, train_src, eval_src = self._prepare_defaults()
        if info.is_main:
            dtrain.barrier(info)
        train = self._load_data(train_src, "train", cfg.max_train_rows)
        held = self._load_data(eval_src, "eval") if eval_src is not None else None
        if self._sampler is None:  # the default run's data, written just now
            self._check_trainable(train)
        self._say(f"train: {len(train)} pairs, {len(train.negatives)} negative column(s) from {train.source}")

        # the newest checkpoint whose files match their checksums (a damaged one is skipped, with a warning)
        found = latest_checkpoint(self.output) if cfg.resume and info.is_main else None
        resume_from = dtrain.broadcast_object(info, found)
        if cfg.resume and resume_from is None:
            self._say(f"--resume: no checkpoint under {self.output / 'checkpoints'}; starting from scratch")
        student = load_encoder(
            resume_from / "model" if resume_from else student_src, max_seq_length=cfg.max_seq_length, device=self.device
        )
        self.student = student
        dtrain.broadcast_parameters(info, student.model)  # every rank starts from rank 0's weights
        if cfg.gradient_checkpointing:
            enable_checkpointing(student.model)

        guide = load_encoder(guide_src, max_seq_length=cfg.guide_max_seq_length, device=self.device)
        guide.eval().requires_grad_(False)
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.output / "cache"
        # computed once: rank 0 fills the cache while the other ranks wait, then they read it
        if not info.is_main:
            dtrain.barrier(info)
        t_guide = time.perf_counter()
        reset_gpu_peak(self.device)
        table = load_or_compute_guide(
            guide,
            train,
            cache_dir,
            batch_size=guide_batch_size(cfg, self.device),
            dtype=self.autocast_dtype,
            progress=progress,
        )
        guide_record = {"seconds": round(time.perf_counter() - t_guide, 3), **gpu_peak(self.device)}
        if info.is_main:
            dtrain.barrier(info)
        log = MetricsLog(self.output / "metrics.jsonl") if info.is_main else _NullLog()
        log.write(event="start", resume_from=str(resume_from) if resume_from else None, config=cfg.to_dict())
        log.write(event="guide_cache", texts=int(table.table.shape[0]), **guide_record)
        try:
            if held is not None and resume_from is None and info.is_main:
                if cfg.eval_guide:
                    self.results["guide"] = self._evaluate(guide, held, log, "guide")
                self.results["before"] = self._evaluate(student, held, log, "before")
            del guide
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._loop(student, train, table, log, resume_from)
            if info.is_main:
                save_final_model(self._saved(student), self.output)  # atomic, with a checksum manifest
            self._say(f"final model saved in {self.output}")
            if held is not None and info.is_main:
                self.results["after"] = self._evaluate(student, held, log, "after")
                if "before" in self.results:
                    before, after = self.results["before"]["ndcg@10"], self.results["after"]["ndcg@10"]
                    self.results["improved"] = after > before
                    note = "" if after > before else "  (warning: the student did not improve on the held-out set)"
                    self._say(f"ndcg@10: {before:.4f} -> {after:.4f}{note}")
        finally:
            log.close()
        self.results["output"] = str(self.output)
        if info.is_main:
            atomic_write_text(self.output / "results.json", json.dumps(self.results, indent=2) + "\n")
        return self.results

    def _saved(self, student: Encoder) -> Any:
        """What the checkpoints and the final model save: the student, recording its Matryoshka sizes
        (in ``config_sentence_transformers.json``) when it is trained with them."""
        dims = self.config.matryoshka_dims
        return student if dims is None else RecordingDims(student, dims)

    def _evaluate(self, encoder: Encoder, held: PairData, log: MetricsLog, when: str) -> dict:
        dims = self.config.matryoshka_dims if encoder is self.student else None  # not the guide's sizes
        m = evaluate(
            encoder, held, batch_size=self.config.eval_batch_size, dtype=self.autocast_dtype, progress=False, dims=dims
        )
        log.write(event="eval", when=when, **m)
        self._say(f"eval ({when}): {format_metrics(m)}  [{m['queries']} queries, {m['corpus']} documents]")
        for line in format_dim_metrics(m):  # Matryoshka: the embeddings truncated to each size
            self._say(f"  {line}")
        return m

    def _loop(self, student: Encoder, train: PairData, table, log: MetricsLog, resume_from: Path | None) -> None:
        from tqdm.auto import tqdm

        cfg = self.config
        sampler = self._sampler  # built and checked with the data (_check_trainable)
        epochs = (cfg.epochs if cfg.epochs is not None else 1) if cfg.max_steps is None else None  # default: 1 epoch
        schedule = BatchSchedule(sampler, epochs=epochs, max_steps=cfg.max_steps)
        total = schedule.total_steps
        decay, no_decay = [], []
        for name, p in student.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
        )
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, total))
        identity = {
            "data": train.fingerprint(),
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "total_steps": total,
            "guide": table.key,
        }
        start = 0
        if resume_from is not None:
            start = load_state(resume_from, optimizer, scheduler, identity, self.device)
            self._say(f"resumed from {resume_from} at step {start}/{total}")
            log.write(event="resume", step=start, checkpoint=str(resume_from))
        loss_options = LossOptions(
            temperature=cfg.temperature,
            margin_strategy=cfg.margin_strategy,
            margin=cfg.margin,
            contrast_anchors=cfg.contrast_anchors,
            contrast_positives=cfg.contrast_positives,
            backend=cfg.loss_backend,
            gather_across_devices=self.dist.enabled,  # each rank scores its anchors against all ranks' candidates
            matryoshka_dims=cfg.matryoshka_dims,
            matryoshka_weights=cfg.matryoshka_weights,
        )
        student.train()
        columns = train.columns()
        tokens = TokenCache(student.tokenizer, student.max_seq_length)  # every text tokenized once per run
        last_ckpt = resume_from
        previous = signal.getsignal(signal.SIGINT)
        self._stop_requested = False

        first_sigint = [0.0]

        def on_sigint(signum, frame):
            # under torchrun a terminal's Ctrl-C reaches each worker twice at once (from the terminal, and
            # forwarded by torchrun, which kills the workers 30 s later): count those as one
            repeat = self.dist.enabled and time.monotonic() - first_sigint[0] < 2.0
            if self._stop_requested and not repeat:  # second Ctrl-C: abort now, keep the checkpoints on disk
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            if self._stop_requested:
                return
            self._stop_requested = True
            first_sigint[0] = time.monotonic()
            if self.dist.is_main:
                tqdm.write(
                    "Ctrl-C: finishing this step, then saving a checkpoint (press again to abort without saving)"
                )

        in_main = _is_main_thread()
        if in_main:
            signal.signal(signal.SIGINT, on_sigint)
        info = self.dist
        bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not (cfg.progress and info.is_main))
        params = [p for g in optimizer.param_groups for p in g["params"]]
        t0 = time.perf_counter()
        seen = 0
        try:
            for pos, rows in schedule.iterate(start):
                t_step = time.perf_counter()
                reset_gpu_peak(self.device)
                phases = StepPhases(self.device)
                global_rows, rows = len(rows), dtrain.shard_rows(info, rows)  # this rank's slice of the batch
                if not rows:  # fewer rows than processes (an epoch's end): nothing to contrast, no update
                    scheduler.step()
                    log.write(event="skip", step=pos.step + 1, rows=global_rows)
                    bar.update(1)
                    continue
                batch_cols = [[col[i] for i in rows] for col in columns]
                guide_cols = table.batch(rows, self.device)
                try:
                    loss = gradcache_step(
                        student,
                        batch_cols,
                        guide_cols,
                        mini_batch_size=cfg.mini_batch_size,
                        loss_options=loss_options,
                        autocast_dtype=self.autocast_dtype,
                        phases=phases,
                        token_cache=tokens,
                    )
                    dtrain.all_reduce_gradients(info, params)  # the mean over ranks: the global batch's gradient
                    loss = dtrain.mean_over_ranks(info, loss)  # the global batch's loss, for the log
                    max_norm = cfg.max_grad_norm or float("inf")  # 0 or None: no clipping
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()  # the one read after backward
                    if not math.isfinite(grad_norm):
                        raise NonFiniteLossError(f"the gradient norm is {grad_norm}")
                except NonFiniteLossError as e:
                    optimizer.zero_grad(set_to_none=True)
                    kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                    log.write(event="nonfinite", step=pos.step + 1, message=str(e))
                    raise NonFiniteLossError(
                        f"{e} at step {pos.step + 1} (epoch {pos.epoch}, batch {pos.batch}); stopped without "
                        f"applying it; {kept} (resume with --resume, perhaps with a lower --lr "
                        "or a higher --temperature)"
                    ) from None
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step = pos.step + 1
                seen += len(rows) * info.world
                dt = time.perf_counter() - t_step
                rate = seen / (time.perf_counter() - t0)
                log.write(
                    step=step,
                    epoch=pos.epoch,
                    loss=loss.item(),
                    lr=scheduler.get_last_lr()[0],
                    grad_norm=grad_norm,
                    rows=len(rows) * info.world,
                    step_s=round(dt, 4),
                    samples_per_s=round(rate, 3),
                    phase_s=phases.seconds(),  # tokenize / encode / loss / reencode
                    **gpu_peak(self.device),  # this step's peak (CUDA only)
                )
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:.1f}")
                for cb in self.callbacks:
                    cb(self, pos, loss)
                is_last = step == total
                self._stop_requested = dtrain.any_rank(info, self._stop_requested)  # all ranks stop together
                if (cfg.save_steps and step % cfg.save_steps == 0 and not is_last) or self._stop_requested:
                    if info.is_main:
                        last_ckpt = save_checkpoint(
                            self.output, self._saved(student), optimizer, scheduler, step, identity
                        )
                        prune_checkpoints(self.output, cfg.save_total_limit, keep=last_ckpt)
                        log.write(event="checkpoint", step=step, path=str(last_ckpt))
                    last_ckpt = dtrain.broadcast_object(info, last_ckpt)
                if self._stop_requested and not is_last:
                    raise TrainingInterrupted(
                        f"interrupted after step {step}/{total}; checkpoint saved in {last_ckpt} "
                        "(continue with --resume)",
                        last_ckpt,
                    )
        finally:
            bar.close()
            if in_main:
                signal.signal(signal.SIGINT, previous)
        self.results["steps"] = total
        self.results["train_samples_per_s"] = seen / max(time.perf_counter() - t0, 1e-9)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


__all__ = ["Trainer", "TrainingInterrupted", "NonFiniteLossError", "linear_schedule"]
