"""The public GIST loss: one function, one module, every backend behind them."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .backends import run as run_backend
from .inputs import MarginStrategy, Reduction, validate


def gist_loss(
    anchor: Tensor,
    positive: Tensor,
    guide_anchor: Tensor,
    guide_positive: Tensor,
    negatives: Tensor | Sequence[Tensor] | None = None,
    guide_negatives: Tensor | Sequence[Tensor] | None = None,
    *,
    temperature: float = 0.01,
    margin_strategy: MarginStrategy = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    reduction: Reduction = "mean",
    backend: str = "auto",
    gather_across_devices: bool = False,
    matryoshka_dims: Sequence[int] | None = None,
    matryoshka_weights: Sequence[float] | None = None,
) -> Tensor:
    """GISTEmbed's guided contrastive loss, exactly as sentence-transformers' ``GISTEmbedLoss``.

    Each anchor ``i`` is scored against its positive and the in-batch candidates (other positives;
    other anchors when ``contrast_anchors``; other positives from the positive side when
    ``contrast_positives``; every negative column). A candidate is dropped (its logit set to -inf)
    when the frozen guide finds it closer to the anchor than the threshold derived from the guide's
    anchor-positive similarity ``t_i``: ``t_i - margin`` (absolute) or ``t_i - |t_i| * margin``
    (relative). The positive itself is never dropped. Similarities are cosine, logits are divided by
    ``temperature``, and the loss is the softmax cross-entropy with the positive as target.

    Args:
        anchor: (B, d) student embeddings of the anchors.
        positive: (B, d) student embeddings of the positives; row i is anchor i's positive.
        guide_anchor: (B, dg) guide embeddings of the anchors (no gradient flows to them).
        guide_positive: (B, dg) guide embeddings of the positives.
        negatives: None, one (B, d) tensor, a (k, B, d) tensor or a sequence of k (B, d) tensors:
            the student's hard-negative columns.
        guide_negatives: the guide's embeddings of the same k columns, (B, dg) each.
        temperature: logit scale is 1 / temperature; must be finite and >= 1e-4
            (``gist_fast.inputs.MIN_TEMPERATURE``: below it float32 round-off takes over the
            gradients, see docs/loss.md).
        margin_strategy: ``"absolute"`` or ``"relative"``.
        margin: margin of the false-negative filter (may be negative).
        contrast_anchors: add the anchor-anchor block.
        contrast_positives: add the positive-positive block.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (a (B,) tensor).
        backend: ``"auto"`` (on CUDA the faster Triton plan for the shape, see
            `gist_fast.backends.triton_plan`; else tiled PyTorch), ``"torch"`` (tiled, memory linear
            in B, any device), ``"triton"`` (fused GPU kernels), ``"triton_chunked"`` (the same
            loss on the GPU as GEMM-shaped kernels per chunk of the logits), ``"cpp"`` (native C++ CPU kernel,
            compiled with ninja on first use; 1.4-2.7x faster than ``"torch"`` on a 2-core CPU),
            ``"reference"`` (materialised, readable), or another registered backend.
        gather_across_devices: when True and torch.distributed is initialised with more than one
            process, score this process's B anchors against the candidates of all W processes:
            ``positive``, ``negatives`` and their guide embeddings are all-gathered (P = W·B rows,
            in rank order), the anchors stay local, and anchor i's target is candidate
            ``rank·B + i``. The student candidates are gathered with gradient: each process's local
            candidates receive the sum over processes of the gradients of their losses (the
            semantics of ``torch.distributed.nn.all_gather``, as in sentence-transformers), so
            the concatenated input gradients of all processes are those of the single-process loss
            over the concatenated batch with ``reduction="sum"``; with ``"mean"`` each process
            averages over its own B rows. Every process must call the loss (and its backward) with
            the same B, dims and number of negative columns; this is checked. Works with any
            torch.distributed backend (NCCL: reduce-scatter; gloo: all-reduce). A no-op when
            torch.distributed is not initialised or has one process.
        matryoshka_dims: None, or distinct ints m in [1, d]: return the Matryoshka loss
            ``sum_m w_m * L(anchor[:, :m], positive[:, :m], negatives[..., :m]; the same guide
            inputs)``, each L this loss on the first m student features (cosine after truncation,
            as sentence-transformers' ``MatryoshkaLoss`` truncates before its loss normalises),
            with every option, reduction (``"none"``: the per-row weighted sum) and the gather as
            above. The "reference", "torch" and "triton_chunked" backends compute all dims in
            one pass (the guide mask once, the student dots of every prefix from one sweep over the
            features); the others ("cpp", "triton") are called once per dim, which is correct but
            repeats the guide's work.
        matryoshka_weights: the w_m, one finite number per dim; default all 1.

    Returns:
        A scalar, or a (B,) tensor for ``reduction="none"``: float64 when any input is float64,
        else float32 (half-precision inputs accumulate in float32). Gradients come back in each
        input's own dtype.

    Raises:
        ValueError / TypeError naming the argument for inconsistent shapes, dtypes or devices, an
        empty batch, NaN or Inf embeddings, a row whose squared norm overflows the compute dtype
        (named with its row), or an invalid option. docs/loss.md states the loss in full.

    Example:
        >>> import torch, gist_fast
        >>> a, p, n = torch.randn(3, 8, 16, requires_grad=True).unbind(0)
        >>> ga, gp, gn = torch.randn(3, 8, 32).unbind(0)
        >>> loss = gist_fast.gist_loss(a, p, ga, gp, n, gn, temperature=0.05)
        >>> loss.backward()

        Across processes (e.g. under ``torchrun --nproc_per_node 2``), each process passes its own
        shard and gets the loss of its anchors against every process's candidates::

            torch.distributed.init_process_group("nccl")  # or "gloo" on CPUs
            loss = gist_fast.gist_loss(a, p, ga, gp, n, gn, gather_across_devices=True)

        One model for several embedding sizes (Matryoshka), the prefixes 16, 8 and 4 of d = 16::

            loss = gist_fast.gist_loss(a, p, ga, gp, n, gn, matryoshka_dims=(16, 8, 4))
    """
    inputs, options = validate(
        anchor,
        positive,
        guide_anchor,
        guide_positive,
        negatives,
        guide_negatives,
        temperature=temperature,
        margin_strategy=margin_strategy,
        margin=margin,
        contrast_anchors=contrast_anchors,
        contrast_positives=contrast_positives,
        reduction=reduction,
        matryoshka_dims=matryoshka_dims,
        matryoshka_weights=matryoshka_weights,
    )
    if not isinstance(gather_across_devices, bool):
        raise TypeError(f"gather_across_devices must be a bool; got {type(gather_across_devices).__name__}")
    if gather_across_devices:
        from .distributed import gather_candidates

        inputs, options = gather_candidates(inputs, options)
    return run_backend(backend, inputs, options)


class GISTLoss(nn.Module):
    """`gist_loss` as a module holding its options.

    Args: as the keyword arguments of `gist_loss`, ``gather_across_devices`` and the Matryoshka
    ones included.

    Example:
        >>> import torch, gist_fast
        >>> criterion = gist_fast.GISTLoss(temperature=0.05, margin=0.1)
        >>> a, p = torch.randn(2, 8, 16, requires_grad=True).unbind(0)
        >>> ga, gp = torch.randn(2, 8, 32).unbind(0)
        >>> criterion(a, p, ga, gp).backward()
    """

    def __init__(
        self,
        temperature: float = 0.01,
        margin_strategy: MarginStrategy = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        reduction: Reduction = "mean",
        backend: str = "auto",
        gather_across_devices: bool = False,
        matryoshka_dims: Sequence[int] | None = None,
        matryoshka_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.margin_strategy = margin_strategy
        self.margin = margin
        self.contrast_anchors = contrast_anchors
        self.contrast_positives = contrast_positives
        self.reduction = reduction
        self.backend = backend
        self.gather_across_devices = gather_across_devices
        self.matryoshka_dims = matryoshka_dims
        self.matryoshka_weights = matryoshka_weights

    def forward(
        self,
        anchor: Tensor,
        positive: Tensor,
        guide_anchor: Tensor,
        guide_positive: Tensor,
        negatives: Tensor | Sequence[Tensor] | None = None,
        guide_negatives: Tensor | Sequence[Tensor] | None = None,
    ) -> Tensor:
        return gist_loss(
            anchor,
            positive,
            guide_anchor,
            guide_positive,
            negatives,
            guide_negatives,
            temperature=self.temperature,
            margin_strategy=self.margin_strategy,
            margin=self.margin,
            contrast_anchors=self.contrast_anchors,
            contrast_positives=self.contrast_positives,
            reduction=self.reduction,
            backend=self.backend,
            gather_across_devices=self.gather_across_devices,
            matryoshka_dims=self.matryoshka_dims,
            matryoshka_weights=self.matryoshka_weights,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, margin_strategy={self.margin_strategy!r}, margin={self.margin}, "
            f"contrast_anchors={self.contrast_anchors}, contrast_positives={self.contrast_positives}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}, "
            f"gather_across_devices={self.gather_across_devices}"
            + (
                ""
                if self.matryoshka_dims is None
                else f", matryoshka_dims={self.matryoshka_dims}, matryoshka_weights={self.matryoshka_weights}"
            )
        )
