import pytest
import torch
from cli_runs import save_tiny_models


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and do not stall when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))
