import os
import sys
from pathlib import Path

# Tests never reach the network: set before any test module imports huggingface_hub or gradio, and
# inherited by the app processes the tests start.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: handing work to a second thread costs more than
    the math, and other test runs share the two cores of this machine. Used as
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A folder with the three tiny real-format weight files (tests/tiny_ckpts.py), one per test module."""
    from tests.tiny_ckpts import write_tiny_ckpts

    return write_tiny_ckpts(tmp_path_factory.mktemp("ckpts"))
