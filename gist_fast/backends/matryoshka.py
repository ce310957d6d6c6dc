"""Matryoshka losses for backends without a one-pass path: one backend call per prefix dim.

``sum_m w_m * L(student[..., :m]; guide)``, each L the GIST loss of the truncated student
embeddings against the full guide embeddings. This is correct for every backend but pays the guide
similarities and the student dots once per dim; backends marked `common.one_pass_matryoshka`
compute all dims in one sweep instead.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor

from ..inputs import GISTInputs, GISTOptions


def truncated(inputs: GISTInputs, dim: int) -> GISTInputs:
    """The inputs with every student embedding cut to its first `dim` features (views, with
    gradient); the guide embeddings unchanged."""
    return replace(
        inputs,
        anchor=inputs.anchor[:, :dim],
        positive=inputs.positive[:, :dim],
        negatives=tuple(n[:, :dim] for n in inputs.negatives),
    )


def single_dimension(options: GISTOptions) -> GISTOptions:
    """`options` without the Matryoshka fields."""
    return replace(options, matryoshka_dims=None, matryoshka_weights=None)


def compose_per_dimension(backend_fn, inputs: GISTInputs, options: GISTOptions) -> Tensor:
    """``sum_m w_m * backend_fn(truncated(inputs, m), options)`` over ``options.matryoshka_dims``."""
    plain = single_dimension(options)
    total = None
    for dim, weight in zip(options.matryoshka_dims, options.matryoshka_weights, strict=True):
        loss = backend_fn(truncated(inputs, dim), plain)
        term = loss if weight == 1.0 else loss * weight
        total = term if total is None else total + term
    return total
