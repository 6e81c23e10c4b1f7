import os
import sys
from pathlib import Path

# Tests never reach the network: set before any test module imports huggingface_hub or gradio, and
# inherited by the app processes the tests start.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(2)
