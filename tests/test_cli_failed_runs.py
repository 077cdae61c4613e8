"""A run that fails before writing results leaves nothing that blocks the corrected rerun."""

import pytest

from cli_helpers import latentflow, leftovers, save_small_tiny_model


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory):
    return save_small_tiny_model(tmp_path_factory.mktemp("nan") / "m", nan=True)


def test_failed_run_does_not_block_the_corrected_rerun(nan_model_dir, tmp_path):
    """A run that fails before storing results leaves no manifest that refuses the next run."""
    good = save_small_tiny_model(tmp_path / "good")
    report, sweep = tmp_path / "report", tmp_path / "sweep"
    probe = ["probe", "--quick", "--clips", "1", "--seconds", "0.125", "--experiments", "p0", "--out", report,
             "--no-progress", "--threads", "1"]
    assert latentflow(*probe, "--model", nan_model_dir).returncode == 1
    assert (report / "protocol.json").exists() and not (report / "summary.json").exists()
    rerun = latentflow(*probe, "--model", good)
    assert rerun.returncode == 0, rerun.stderr
    sw = ["sweep", "--steps", "1", "--clip-seconds", "0.125", "--kinds", "uniform", "--evaluations", "0",
          "--sites", "layers.0.self_attn", "--no-progress", "--out", sweep]
    assert latentflow(*sw, "--model", nan_model_dir).returncode == 1
    rerun = latentflow(*sw, "--model", good)
    assert rerun.returncode == 0, rerun.stderr


def test_probe_with_bad_backend_leaves_nothing(tmp_path):
    out = tmp_path / "report"
    bad = latentflow("probe", "--quick", "--backend", "nonsense", "--out", out, "--no-progress")
    assert bad.returncode == 2 and "--backend" in bad.stderr
    assert leftovers(out) == []


def test_engine_refuses_unknown_backend_at_construction():
    from latentflow_fast.probe import ProbeEngine
    from latentflow_fast.models.tiny import build_tiny_model

    with pytest.raises(ValueError, match="backend: unknown backend 'nonsense'"):
        ProbeEngine(build_tiny_model(), backend="nonsense")
