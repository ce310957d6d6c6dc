"""Text encoders: a transformers model, its tokenizer and a pooling rule, loaded and saved in the
sentence-transformers layout so that both ``transformers`` and ``SentenceTransformer(path)`` read
what the trainer writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .extras import require
from .tokens import to_device, tokenize_pool

POOLING_MODES = ("mean", "cls", "lasttoken", "max")

# sentence-transformers' legacy boolean keys -> our pooling names
_LEGACY_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_max_tokens": "max",
}


def pool(token_embeddings: Tensor, attention_mask: Tensor, mode: str) -> Tensor:
    """Pool token embeddings into one vector per text, as sentence-transformers' ``Pooling`` does.

    Args:
        token_embeddings: (n, seq, d) last hidden states.
        attention_mask: (n, seq) 1 for real tokens, 0 for padding (left or right).
        mode: ``"mean"`` (masked mean), ``"cls"`` (first real token), ``"lasttoken"`` (last real
            token) or ``"max"`` (masked max).

    Returns:
        (n, d) pooled embeddings in the token embeddings' dtype (means accumulate in float32).
    """
    mask = attention_mask.unsqueeze(-1)
    if mode == "mean":
        summed = (token_embeddings * mask.to(token_embeddings.dtype)).sum(1, dtype=torch.float32)
        count = mask.sum(1, dtype=torch.float32).clamp(min=1e-9)
        return (summed / count).to(token_embeddings.dtype)
    if mode == "cls":
        first = attention_mask.to(torch.int).argmax(dim=1)
        return token_embeddings[torch.arange(token_embeddings.shape[0], device=first.device), first]
    if mode == "lasttoken":
        seq_len = attention_mask.shape[1]
        values, flipped = attention_mask.flip(1).max(1)
        last = torch.where(values == 0, seq_len - 1, seq_len - 1 - flipped)
        return token_embeddings[torch.arange(token_embeddings.shape[0], device=last.device), last]
    if mode == "max":
        return token_embeddings.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    raise ValueError(f"pooling must be one of {POOLING_MODES}; got {mode!r}")


class Encoder(nn.Module):
    """A transformers model + tokenizer + pooling (+ optional L2 normalisation) as one module.

    Args:
        model: a transformers ``PreTrainedModel`` whose forward returns ``last_hidden_state``.
        tokenizer: its tokenizer (any ``PreTrainedTokenizerBase``).
        pooling: one of ``POOLING_MODES``.
        normalize: L2-normalise the pooled embeddings (the sentence-transformers ``Normalize`` module).
        max_seq_length: texts are truncated to this many tokens.
        name: where the model came from (a path or hub id); part of :meth:`identity`.

    Example:
        >>> enc = load_encoder("sentence-transformers/all-MiniLM-L6-v2")  # doctest: +SKIP
        >>> emb = enc.encode(["a sentence", "another one"])  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        pooling: str = "mean",
        normalize: bool = False,
        max_seq_length: int = 256,
        name: str = "",
    ) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}; got {pooling!r}")
        if max_seq_length < 1:
            raise ValueError(f"max_seq_length must be >= 1; got {max_seq_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_seq_length = int(max_seq_length)
        self.name = name
        self._source_stamp: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, Tensor]:
        """Tokenize ``texts`` with padding to the longest and truncation to ``max_length`` tokens."""
        out = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=max_length or self.max_seq_length,
            return_tensors="pt",
        )
        return dict(out)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """Embed tokenized texts: (n, seq) features -> (n, d) embeddings (with grad if enabled)."""
        device = self.device
        host_mask = features.get("attention_mask")
        features = {k: to_device(v, device) for k, v in features.items()}  # async from pinned memory on CUDA
        model_inputs = features
        if host_mask is not None and host_mask.device.type == "cpu" and takes_prepared_mask(self.model):
            # transformers would test the mask for padding on the device (a host sync per forward);
            # the host copy answers it for free: no padding -> no mask, else the ready SDPA mask
            model_inputs = dict(features)
            if bool(host_mask.all()):
                del model_inputs["attention_mask"]
            else:
                model_inputs["attention_mask"] = features["attention_mask"][:, None, None, :].bool()
        hidden = self.model(**model_inputs, return_dict=True).last_hidden_state
        emb = pool(hidden, features["attention_mask"], self.pooling)
        if self.normalize:
            emb = torch.nn.functional.normalize(emb.float(), p=2, dim=-1).to(emb.dtype)
        return emb

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 64,
        max_length: int | None = None,
        dtype: torch.dtype | None = None,
        progress: bool | str = False,
    ) -> Tensor:
        """Embed ``texts`` without grad, in batches sorted by token length; returns (n, d) float32 on the CPU.

        The texts are tokenized once, ordered longest first and cut into batches of ``batch_size``
        (as the training mini-batches are), so each batch pads to similar lengths. On CUDA the
        padded batches go over from pinned memory without blocking and the embeddings stay on the
        device until one copy back at the end: no host synchronisation per batch.

        Args:
            texts: the raw strings.
            batch_size: texts per forward pass.
            max_length: token limit (default ``self.max_seq_length``).
            dtype: autocast dtype (e.g. ``torch.bfloat16`` on CUDA); None runs in the weights' dtype.
            progress: show a tqdm bar (a string is used as its description).
        """
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if len(texts) == 0:
            return torch.empty(0, self.dim, dtype=torch.float32)
        was_training = self.training
        self.eval()
        device = self.device
        pool = tokenize_pool(self, list(texts), batch_size, max_length=max_length)
        chunk_rows = to_device(torch.cat(pool.chunks), device).split([len(c) for c in pool.chunks])
        out = torch.empty(len(texts), self.dim, dtype=torch.float32, device=device)
        desc = progress if isinstance(progress, str) else "encode"
        try:
            for c, rows in enumerate(tqdm(chunk_rows, desc=desc, disable=not progress, unit="batch")):
                with autocast(device, dtype):
                    emb = self(pool.features(c, pin_memory=device.type == "cuda"))
                out.index_copy_(0, rows, emb.float())
        finally:
            self.train(was_training)
        return out.cpu()

    def identity(self) -> str:
        """A string that changes whenever the embeddings this encoder produces could change.

        For a model loaded from a local directory it hashes the path, sizes and mtimes of the files
        there (cheap); otherwise it hashes the weights themselves. Pooling and normalisation are
        included; the token limit is keyed separately by the guide cache.
        """
        h = hashlib.sha256()
        h.update(f"{type(self.model).__name__}|{self.pooling}|{self.normalize}|".encode())
        if self._source_stamp is not None:
            h.update(self._source_stamp.encode())
        else:
            for key, value in self.model.state_dict().items():
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        vocab = getattr(self.tokenizer, "vocab_size", None)
        h.update(f"|{type(self.tokenizer).__name__}|{vocab}".encode())
        return h.hexdigest()[:32]

    def save(self, path: str | os.PathLike) -> None:
        """Write the encoder in the sentence-transformers layout (also a plain transformers dir).

        ``path`` gets ``config.json``, ``model.safetensors`` and the tokenizer (loadable with
        ``AutoModel``/``AutoTokenizer``), plus ``modules.json``, ``sentence_bert_config.json``,
        ``1_Pooling/config.json`` and, when normalising, ``2_Normalize/`` (loadable with
        ``SentenceTransformer(path)`` and :func:`load_encoder`).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.normalize:
            modules.append(
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
            )
            (path / "2_Normalize").mkdir(exist_ok=True)
        (path / "1_Pooling").mkdir(exist_ok=True)
        pooling_cfg = {"word_embedding_dimension": self.dim}
        pooling_cfg.update({key: self.pooling == mode for key, mode in _LEGACY_POOLING_KEYS.items()})
        pooling_cfg["pooling_mode_mean_sqrt_len_tokens"] = False
        pooling_cfg["pooling_mode_weightedmean_tokens"] = False
        _write_json(path / "1_Pooling" / "config.json", pooling_cfg)
        _write_json(path / "modules.json", modules)
        _write_json(path / "sentence_bert_config.json", {"max_seq_length": self.max_seq_length, "do_lower_case": False})
        _write_json(
            path / "config_sentence_transformers.json",
            {
                "model_type": "SentenceTransformer",
                "prompts": {},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            },
        )


# encoders whose transformers forward builds its mask with ``create_bidirectional_mask`` and passes a
# ready 4D mask through unchanged (the 2D mask is used for nothing else)
_PREPARED_MASK_MODELS = ("bert", "roberta", "xlm-roberta")


def takes_prepared_mask(model: nn.Module) -> bool:
    """Whether ``model`` can be given its attention mask ready for SDPA: a boolean (n, 1, 1, seq) mask,
    True where a token is attended (what transformers' ``create_bidirectional_mask`` builds from the
    2D mask after checking it for padding on the device); or none when nothing is padded.

    True for BERT, RoBERTa and XLM-R models of transformers 5 attending with SDPA; False otherwise
    (they get the 2D mask as usual).
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _PREPARED_MASK_MODELS:
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    module = sys.modules.get(type(model).__module__)
    return module is not None and "create_bidirectional_mask" in vars(module)


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in backward instead of storing them (non-reentrant)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context when ``dtype`` is None."""
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _pooling_from_config(cfg: dict[str, Any], path: Path) -> str:
    mode = cfg.get("pooling_mode")
    if mode is None:
        active = [name for key, name in _LEGACY_POOLING_KEYS.items() if cfg.get(key)]
        others = [k for k in ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens") if cfg.get(k)]
        if others or len(active) != 1:
            raise ValueError(f"{path}: exactly one of mean / cls / lasttoken / max pooling is supported; got {cfg}")
        mode = active[0]
    if isinstance(mode, (list, tuple)):
        if len(mode) != 1:
            raise ValueError(f"{path}: combined pooling modes {mode} are not supported")
        mode = mode[0]
    if mode not in POOLING_MODES:
        raise ValueError(f"{path}: pooling mode {mode!r} is not supported (use one of {POOLING_MODES})")
    return mode


def _dir_stamp(path: Path) -> str:
    parts = [str(path.resolve())]
    for f in sorted(path.rglob("*")):
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _from_sentence_transformer(st_model: Any, max_seq_length: int | None) -> Encoder:
    modules = list(st_model)
    first = modules[0]
    hf_model = getattr(first, "auto_model", None) or getattr(first, "model", None)
    tokenizer = getattr(first, "tokenizer", None)
    if hf_model is None or tokenizer is None:
        raise TypeError(f"the SentenceTransformer's first module {type(first).__name__} is not a transformers model")
    pooling, normalize = "mean", False
    for m in modules[1:]:
        kind = type(m).__name__
        if kind == "Pooling":
            pm = m.pooling_mode if hasattr(m, "pooling_mode") else m.get_pooling_mode_str()
            pooling = _pooling_from_config({"pooling_mode": pm}, Path("<SentenceTransformer>"))
        elif kind == "Normalize":
            normalize = True
        else:
            raise ValueError(f"SentenceTransformer module {kind} is not supported (Transformer, Pooling, Normalize)")
    limit = max_seq_length or getattr(st_model, "max_seq_length", None) or 256
    return Encoder(hf_model, tokenizer, pooling=pooling, normalize=normalize, max_seq_length=limit, name="in-memory")


def load_encoder(
    source: Any,
    *,
    max_seq_length: int | None = None,
    pooling: str | None = None,
    normalize: bool | None = None,
    device: str | torch.device | None = None,
) -> Encoder:
    """Load an :class:`Encoder` from a directory, a hub id, a ``SentenceTransformer`` or ``(model, tokenizer)``.

    A sentence-transformers layout (``modules.json``) decides the transformer's subfolder, the pooling
    (``1_Pooling/config.json``: mean, CLS, last-token or max) and the normalisation (a ``Normalize``
    module); a plain transformers directory gets mean pooling without normalisation.

    Args:
        source: a local path, a hub id (needs the network or the HF cache), an in-memory
            ``SentenceTransformer``, an :class:`Encoder`, or a ``(PreTrainedModel, tokenizer)`` pair.
        max_seq_length: token limit; default: the saved ``sentence_bert_config.json`` value, else
            the tokenizer's ``model_max_length`` capped at 512.
        pooling / normalize: override what the layout says.
        device: move the model there.

    Raises:
        FileNotFoundError naming the path when a local directory lacks the model files;
        ValueError for an unsupported pooling or module.
    """
    if isinstance(source, Encoder):
        enc = source
    elif isinstance(source, tuple) and len(source) == 2:
        model, tokenizer = source
        enc = Encoder(model, tokenizer, pooling=pooling or "mean", max_seq_length=max_seq_length or 256)
    elif type(source).__name__ == "SentenceTransformer":
        enc = _from_sentence_transformer(source, max_seq_length)
    elif isinstance(source, (str, os.PathLike)):
        enc = _load_from_path(str(source), max_seq_length)
    else:
        raise TypeError(
            "model must be a path, a hub id, a SentenceTransformer, an Encoder or a (model, tokenizer) pair; "
            f"got {type(source).__name__}"
        )
    if pooling is not None:
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}; got {pooling!r}")
        enc.pooling = pooling
    if normalize is not None:
        enc.normalize = normalize
    if max_seq_length is not None:
        enc.max_seq_length = int(max_seq_length)
    if device is not None:
        enc.to(device)
    return enc


def _load_from_path(source: str, max_seq_length: int | None) -> Encoder:
    transformers = require("transformers", f"loading the model {source}")
    AutoModel, AutoTokenizer = transformers.AutoModel, transformers.AutoTokenizer  # noqa: N806

    root = Path(source)
    is_local = root.exists()
    if not is_local and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise FileNotFoundError(f"model directory {source} does not exist")
    if not is_local:
        from huggingface_hub import snapshot_download

        try:
            root = Path(snapshot_download(source))
        except Exception as e:  # noqa: BLE001 - rewrap with the id and the offline hint
            raise FileNotFoundError(
                f"could not fetch model {source!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
                "pass a local directory, or unset HF_HUB_OFFLINE if you meant to download it"
            ) from e
    if not root.is_dir():
        raise FileNotFoundError(f"model path {root} is not a directory")
    model_dir, pooling, normalize = root, "mean", False
    seq_cfg: dict[str, Any] = {}
    if (root / "modules.json").exists():
        for module in _read_json(root / "modules.json"):
            kind = module.get("type", "").rsplit(".", 1)[-1]
            sub = root / module.get("path", "")
            if kind == "Transformer":
                model_dir = sub
            elif kind == "Pooling":
                pooling = _pooling_from_config(_read_json(sub / "config.json"), sub / "config.json")
            elif kind == "Normalize":
                normalize = True
            else:
                raise ValueError(f"{root / 'modules.json'}: module type {module.get('type')} is not supported")
        for name in ("sentence_bert_config.json",):
            if (model_dir / name).exists():
                seq_cfg = _read_json(model_dir / name)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a transformers model directory")
    from .checkpoint import check_model_directory

    check_model_directory(root, model_dir)  # not half-saved, matches its checksums, has its tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir)
    limit = max_seq_length or seq_cfg.get("max_seq_length") or min(getattr(tokenizer, "model_max_length", 512), 512)
    enc = Encoder(model, tokenizer, pooling=pooling, normalize=normalize, max_seq_length=int(limit), name=str(source))
    if is_local:
        enc._source_stamp = _dir_stamp(root)
    return enc
