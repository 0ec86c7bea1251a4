import sys
from pathlib import Path

import pytest

# tests/user_models.py is importable as a user's own module (``user_models:tiny_cnn``).
TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture(autouse=True)
def _single_thread_torch():
    # Two cores in CI: keep torch from oversubscribing when Ray workers run beside it.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
