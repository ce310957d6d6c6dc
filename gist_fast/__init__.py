"""gist-fast: the GISTEmbed contrastive loss, exact and memory-linear, and a trainer built on it."""

from .loss import GISTLoss, gist_loss

__version__ = "0.1.0"
__all__ = ["GISTLoss", "gist_loss", "__version__"]
