"""Tiny encoders built in-process, for tests and examples (no download, a few thousand parameters)."""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch

from .encoders import Encoder

_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "is",
    "are",
    "was",
    "be",
    "and",
    "or",
    "not",
    "for",
    "with",
    "on",
    "by",
    "as",
    "at",
    "from",
    "this",
    "that",
    "it",
    "its",
    "which",
    "return",
    "returns",
    "value",
    "values",
    "list",
    "dict",
    "string",
    "file",
    "path",
    "object",
    "class",
    "function",
    "method",
    "module",
    "number",
    "integer",
    "float",
    "error",
    "raise",
    "if",
    "else",
    "none",
    "true",
    "false",
    "new",
    "data",
    "time",
    "name",
    "type",
    "default",
    "create",
    "read",
    "write",
    "open",
    "close",
    "set",
    "get",
    "add",
    "remove",
    "call",
    "argument",
    "arguments",
    "result",
    "results",
    "test",
]


def make_tiny_tokenizer(directory: str | os.PathLike):
    """A BERT WordPiece tokenizer over a small vocabulary (words, letters, digits), saved in ``directory``."""
    from transformers import BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *chars, *("##" + c for c in chars)]
    vocab = list(dict.fromkeys(vocab))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers 5 ignores vocab_file here (every word became [UNK]): pass the mapping itself.
    return BertTokenizerFast(vocab={word: index for index, word in enumerate(vocab)}, do_lower_case=True)


def make_tiny_encoder(
    directory: str | os.PathLike,
    *,
    hidden_size: int = 32,
    layers: int = 2,
    pooling: str = "mean",
    normalize: bool = False,
    dropout: float = 0.0,
    seed: int = 0,
    max_seq_length: int = 64,
) -> Encoder:
    """A randomly initialised BERT encoder with ``layers`` layers of width ``hidden_size``.

    Example:
        >>> import tempfile
        >>> enc = make_tiny_encoder(tempfile.mkdtemp())
        >>> enc.encode(["hello world"]).shape
        torch.Size([1, 32])
    """
    from transformers import BertConfig, BertModel

    tokenizer = make_tiny_tokenizer(directory)
    config = BertConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max(128, max_seq_length),
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    model = BertModel(config, add_pooling_layer=False)
    return Encoder(model, tokenizer, pooling=pooling, normalize=normalize, max_seq_length=max_seq_length, name="tiny")
