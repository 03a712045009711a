# Triton reads TRITON_INTERPRET when it is imported: set it before anything imports triton, so the
# Triton kernels run in the interpreter on CPU tensors (CI has no GPU). On a CUDA machine, export
# LOWRANK_TEST_GPU=1 to run the same tests compiled on the device instead.
import os

if os.environ.get("LOWRANK_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and do not stall when other processes share the cores
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: CUDA when LOWRANK_TEST_GPU=1, else CPU (Triton interpreter)."""
    return torch.device("cuda" if os.environ.get("LOWRANK_TEST_GPU") == "1" else "cpu")
