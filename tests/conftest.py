import os
import sys

# Triton kernels run on the CPU through the interpreter when there is no GPU; the variable must be
# set before triton is imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `problems` (test helpers) and `benchmarks.st_injection` (the sentence-transformers oracle).
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from problems import SESSION_SEED  # noqa: E402


def pytest_report_header(config):
    return f"gist-fast random inputs: GIST_TEST_SEED={SESSION_SEED} (set it to replay this run)"
