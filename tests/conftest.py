"""Shared test setup.

Triton kernels run on CPU tensors through the Triton interpreter when no GPU is present; the
variable must be set before triton is first imported, so it is set here, at collection start.
"""
import os

import pytest
import torch

from helpers import HAS_CUDA
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Outputs the C++ kernels' bindings allocate themselves are NaN-filled before the kernel writes them (read
# once, when ddpm_fast._C first allocates one), as the tests poison the buffers they allocate in Python.
os.environ.setdefault("DDPM_FAST_POISON_OUTPUTS", "1")

# One intra-op thread: on the 2-core CI/dev machines torch's thread pool oversubscribes as soon as
# anything else runs (a tiny-UNet forward went from ~15 ms to ~1 s under load), and results are
# then independent of the machine's core count.
torch.set_num_threads(1)

# Comparisons against the reference must not be blurred by TF32 matmuls/convs.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _runs_on_cuda(item) -> bool:
    spec = getattr(item, "callspec", None)
    return "gpu" in item.keywords or (spec is not None and spec.params.get("device") == "cuda")


def pytest_collection_modifyitems(config, items):
    # `gpu` tests need CUDA. `interpreter` tests launch Triton kernels on CPU tensors, which works only
    # under TRITON_INTERPRET=1, i.e. where no GPU is visible (CI, dev machines): on a GPU machine their
    # CPU variants skip (CI covers them) and their CUDA variants run.
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interp = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (no visible GPU)")
    for item in items:
        if not HAS_CUDA and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        elif HAS_CUDA and not INTERPRETING and "interpreter" in item.keywords and not _runs_on_cuda(item):
            item.add_marker(skip_interp)


@pytest.fixture(autouse=True)
def _seed_everything():
    # Fresh but reproducible random inputs for every test.
    torch.manual_seed(0)
    yield
