"""Every test and every test module leaves torch's process-wide settings as it found them.

Tests run in one process, so a test (or a module fixture) that sets the intra-op thread count, turns on
deterministic algorithms or switches the MHA fast path off and does not restore it changes what every later
test measures. These autouse fixtures compare the settings before and after each test and each module;
a change is put back and reported as a failure naming the setting.
"""

from __future__ import annotations

import pytest
import torch


def _settings() -> dict:
    return {
        "torch.get_num_threads()": torch.get_num_threads(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
        "torch.backends.mha.get_fastpath_enabled()": torch.backends.mha.get_fastpath_enabled(),
        "torch.get_default_dtype()": torch.get_default_dtype(),
        "torch.is_grad_enabled()": torch.is_grad_enabled(),
    }


def _restore(before: dict) -> None:
    torch.set_num_threads(before["torch.get_num_threads()"])
    torch.use_deterministic_algorithms(before["torch.are_deterministic_algorithms_enabled()"])
    torch.backends.mha.set_fastpath_enabled(before["torch.backends.mha.get_fastpath_enabled()"])
    torch.set_default_dtype(before["torch.get_default_dtype()"])
    torch.set_grad_enabled(before["torch.is_grad_enabled()"])


def _check(before: dict, where: str) -> None:
    after = _settings()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if changed:
        _restore(before)
        pytest.fail(f"{where} left process-wide torch settings changed (now restored): "
                    + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()), pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def _module_leaves_torch_settings_alone(request):
    before = _settings()
    yield
    _check(before, f"module {request.module.__name__} (a module-scoped fixture?)")


@pytest.fixture(autouse=True)
def _test_leaves_torch_settings_alone(request):
    before = _settings()
    yield
    _check(before, f"test {request.node.name}")
