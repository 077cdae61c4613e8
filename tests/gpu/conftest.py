"""Every test in tests/gpu needs a CUDA device: without one the whole directory is skipped (not failed)."""

from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    # This hook sees the whole session's items: mark only the ones under this directory.
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not HAS_CUDA:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
