"""The default run's data: docstrings of the Python standard library installed on this machine.

Every machine with Python has them, so the default run needs no download. They are read at run
time (never shipped with gist-fast): each function / class / module docstring with a summary line
and a body gives a pair (anchor = summary, positive = body).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import sysconfig
from pathlib import Path

SKIP_DIRS = {
    "test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__",
    "ensurepip", "pydoc_data", "venv",
}  # fmt: skip


def _pairs_from_source(source: str, max_chars: int) -> list[tuple[str, str]]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=False)
        if not doc:
            continue
        doc = inspect.cleandoc(doc)
        head, sep, body = doc.partition("\n\n")
        summary = " ".join(head.split())
        body = " ".join(body.split())
        if not sep or not (4 <= len(summary.split()) <= 40) or len(body.split()) < 8:
            continue
        out.append((summary, _clip(body, max_chars)))
    return out


def _clip(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars)
    return text[: cut if cut > max_chars // 2 else max_chars]


def stdlib_docstring_pairs(
    stdlib_dir: str | os.PathLike | None = None, *, max_chars: int = 400
) -> list[tuple[str, str]]:
    """(summary, body) pairs from the standard library's docstrings, deduplicated, in a stable order.

    Args:
        stdlib_dir: where to look (default: this interpreter's standard library).
        max_chars: bodies are cut at a word boundary before this many characters.

    Example:
        >>> pairs = stdlib_docstring_pairs()
        >>> len(pairs) > 1000
        True
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("test"))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test"))
    seen_a, seen_p, pairs = set(), set(), []
    for f in sorted(files):
        try:
            source = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for a, p in _pairs_from_source(source, max_chars):
            if a in seen_a or p in seen_p:
                continue
            seen_a.add(a)
            seen_p.add(p)
            pairs.append((a, p))
    return pairs


def write_stdlib_splits(
    directory: str | os.PathLike,
    *,
    eval_fraction: float = 0.1,
    max_train: int | None = None,
    max_eval: int | None = None,
    max_chars: int = 400,
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (columns ``anchor``, ``positive``) under ``directory``.

    The split is by a hash of the summary, so it does not depend on the order of files; ``max_train``
    / ``max_eval`` keep the first rows of each split (in that hash order).

    Returns:
        The two paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keyed = sorted(
        (hashlib.sha256(a.encode()).hexdigest(), a, p) for a, p in stdlib_docstring_pairs(max_chars=max_chars)
    )
    cut = int(2**256 * eval_fraction)
    train = [(a, p) for h, a, p in keyed if int(h, 16) >= cut][:max_train]
    held = [(a, p) for h, a, p in keyed if int(h, 16) < cut][:max_eval]
    if not train or not held:
        raise RuntimeError("found too few standard-library docstrings to build the default data set")
    paths = []
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        path = directory / name
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for a, p in rows:
                f.write(json.dumps({"anchor": a, "positive": p}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]
