"""The Triton backend: ``backend="triton"`` (`gist_loss_triton`, the fused plan) and
``backend="triton_chunked"`` (`gist_loss_triton_chunked`, the chunked plan).

Modules, kernels apart from their launch glue (each imports only modules listed before it):

- `shared_kernels`: the JIT helpers both kernel families use, and the row-dot kernel;
- `fused_kernels`, `chunked_kernels`: the two plans' kernels;
- `common`: the inputs laid out for the kernels (padded widths, norms, thresholds, tie codes);
- `fused`: the fused plan's launches (`Blocks`);
- `chunked`, `chunked_matryoshka`: the chunked plan's launches (`Chunks`), plain and Matryoshka;
- `backend`: the autograd glue of both plans and the two backend functions;
- `compile_check`: the offline sm_90 build report,
  ``python -m gist_fast.backends.triton.compile_check``.
"""

from .backend import gist_loss_triton, gist_loss_triton_chunked
from .chunked import Chunks
from .fused import Blocks

__all__ = ["Blocks", "Chunks", "gist_loss_triton", "gist_loss_triton_chunked"]
