"""NaN/Inf model output stops the run with an error naming the evaluation and layer (never NaN WAVs,
"bitwise equal" or "all layers stable" from NaN comparisons)."""

import pytest
import torch

from cli_helpers import latentflow, leftovers, save_small_tiny_model
from latentflow_fast.numerics import NonFiniteError, check_finite


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory):
    return save_small_tiny_model(tmp_path_factory.mktemp("nan") / "m", nan=True)


def test_check_finite_names_what():
    check_finite(torch.ones(3), "x")
    with pytest.raises(NonFiniteError, match=r"velocity has 1 non-finite value\(s\) of 3"):
        check_finite(torch.tensor([1.0, float("inf"), 0.0]), "velocity")


def test_separate_and_engine_name_evaluation_and_layer(nan_model_dir):
    from latentflow_fast import load_model
    from latentflow_fast.probe import Clip, ProbeEngine

    model = load_model(str(nan_model_dir))
    wave = torch.randn(2000) * 0.1
    with pytest.raises(NonFiniteError, match=r"evaluation 0 .*layers\.0\.attention"):
        model.separate(wave, 16_000, "chirp", steps=2)
    # sites with captures run the probed kernel, which names the site and the tensor
    with pytest.raises(NonFiniteError, match=r"clip 'c'.*evaluation 0, layers\.0\.self_attn: q holds"):
        ProbeEngine(model).trajectory(Clip("c", wave, 16_000, "chirp"), steps=2, capture=("entropy",))
    # without captures the clean run uses native attention; the velocity check names the first bad layer
    with pytest.raises(NonFiniteError, match=r"clip 'c' at evaluation 0 .*layers\.0\.attention"):
        ProbeEngine(model).trajectory(Clip("c", wave, 16_000, "chirp"), steps=2)


def test_separate_cli_with_nan_weights_fails_cleanly(nan_model_dir, tmp_path):
    out = tmp_path / "out"
    result = latentflow("separate", "--demo", "--steps", "2", "--model", nan_model_dir, "--out-dir", out)
    assert result.returncode == 1
    assert "non-finite" in result.stderr and "evaluation 0" in result.stderr
    assert "Traceback" not in result.stderr and "NaN" not in result.stdout
    assert leftovers(out) == []  # nothing written: outputs are written after success


def test_probe_cli_with_nan_weights_fails_cleanly(nan_model_dir, tmp_path):
    out = tmp_path / "report"
    result = latentflow("probe", "--quick", "--clips", "1", "--seconds", "0.125", "--experiments", "p0",
                        "--model", nan_model_dir, "--out", out, "--no-progress", "--threads", "1")
    assert result.returncode == 1, result.stderr
    assert "non-finite" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "summary.json").exists()

