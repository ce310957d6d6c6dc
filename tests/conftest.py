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

import pytest  # noqa: E402
from problems import SESSION_SEED  # noqa: E402


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny models, where thread start-up costs more than the
    work (and the CPU is shared). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_report_header(config):
    return f"gist-fast random inputs: GIST_TEST_SEED={SESSION_SEED} (set it to replay this run)"


def pytest_terminal_summary(terminalreporter):
    """The seed again at the end, where `pytest -q` (as `make test` runs it, header hidden) shows it too."""
    terminalreporter.write_line(pytest_report_header(None))
