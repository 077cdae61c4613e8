"""Resuming never returns another setup's rows (issue: stale resumed results with exit code 0).

A results folder records a fingerprint of everything that determines its rows (weights digest, audio
digest, prompts, clip length, sampler, backend); a rerun with anything else is refused naming the
differing fields, or kept separately with --new. Runs `latentflow` in a subprocess, as a user would.
"""

import json

import pandas as pd
import pytest

from cli_helpers import latentflow, save_small_tiny_model, write_wav

SWEEP = ["sweep", "--steps", "2", "--evaluations", "0", "--kinds", "uniform", "--sites", "layers.0.self_attn",
         "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_small_tiny_model(tmp_path_factory.mktemp("model") / "m")


def _rows(folder):
    from latentflow_fast.probe import ResultStore

    return ResultStore(folder / "results", rank=0).load()


def test_sweep_refuses_other_clip_length_and_new_keeps_it_apart(model_dir, tmp_path):
    out = tmp_path / "sweep"
    first = latentflow(*SWEEP, "--model", model_dir, "--clip-seconds", "0.25", "--out", out)
    assert first.returncode == 0, first.stderr
    before = _rows(out)
    again = latentflow(*SWEEP, "--model", model_dir, "--clip-seconds", "0.25", "--out", out)
    assert again.returncode == 0 and "0 computed now" in again.stdout  # same settings: resumed
    other = latentflow(*SWEEP, "--model", model_dir, "--clip-seconds", "0.125", "--out", out)
    assert other.returncode == 2
    assert "other settings" in other.stderr and "clip_seconds" in other.stderr and "audio_sha256" in other.stderr
    assert "Traceback" not in other.stderr
    pd.testing.assert_frame_equal(_rows(out), before)  # nothing mixed in
    kept = latentflow(*SWEEP, "--model", model_dir, "--clip-seconds", "0.125", "--out", out, "--new")
    assert kept.returncode == 0, kept.stderr
    separate = [p for p in tmp_path.iterdir() if p.name.startswith("sweep-")]
    assert len(separate) == 1 and str(separate[0]) in kept.stdout
    new_rows = _rows(separate[0])
    assert len(new_rows) == len(before)
    assert not (new_rows["local_effect"].to_numpy() == before["local_effect"].to_numpy()).all()
    manifest = json.loads((separate[0] / "results" / "manifest.json").read_text())
    assert len(manifest["weights_sha256"]) == 64 and manifest["clip_seconds"] == 0.125


def test_sweep_refuses_same_named_file_with_other_content_or_prompt(model_dir, tmp_path):
    audio = write_wav(tmp_path / "a" / "mix.wav", seed=1)
    out = tmp_path / "sweep"
    args = [*SWEEP, "--model", model_dir, "--out", out, "--audio", audio]
    assert latentflow(*args, "--prompt", "chirp").returncode == 0
    other_prompt = latentflow(*args, "--prompt", "sine tone")
    assert other_prompt.returncode == 2 and "clips[0].prompt" in other_prompt.stderr
    write_wav(audio, seed=2)  # same name, other content
    other_audio = latentflow(*args, "--prompt", "chirp")
    assert other_audio.returncode == 2 and "clips[0].audio_sha256" in other_audio.stderr


def test_sweep_with_another_model_is_refused(model_dir, tmp_path):
    other_model = save_small_tiny_model(tmp_path / "other", seed=1)
    out = tmp_path / "sweep"
    assert latentflow(*SWEEP, "--model", model_dir, "--clip-seconds", "0.125", "--out", out).returncode == 0
    # same file names and config, other weights
    refused = latentflow(*SWEEP, "--model", other_model, "--clip-seconds", "0.125", "--out", out)
    assert refused.returncode == 2 and "weights_sha256" in refused.stderr


def test_sweep_prints_only_this_runs_rows(model_dir, tmp_path):
    out = tmp_path / "sweep"
    base = ["sweep", "--steps", "2", "--sites", "layers.0.self_attn", "--no-progress", "--threads", "1",
            "--model", model_dir, "--clip-seconds", "0.125", "--out", out]
    assert latentflow(*base, "--kinds", "uniform", "--evaluations", "0,1").returncode == 0
    second = latentflow(*base, "--kinds", "uniform", "--evaluations", "1")
    assert second.returncode == 0
    # 2 heads x evaluation 1 = 2 probes; the 2 rows of evaluation 0 stored earlier are not shown
    assert "2 probe results (0 computed now, 2 already stored" in second.stdout


def test_probe_with_same_named_audio_of_other_content_is_refused(model_dir, tmp_path):
    audio = write_wav(tmp_path / "in" / "clip.wav", seed=1)
    out = tmp_path / "report"
    args = ["probe", "--quick", "--experiments", "p0", "--model", model_dir, "--audio", audio, "--prompt", "chirp",
            "--out", out, "--no-progress", "--threads", "1"]
    first = latentflow(*args)
    assert first.returncode == 0, first.stderr
    protocol = json.loads((out / "protocol.json").read_text())
    assert len(protocol["clips"][0]["audio_sha256"]) == 64 and len(protocol["model"]["weights_sha256"]) == 64
    summary = (out / "summary.json").read_bytes()
    write_wav(audio, seed=3)
    refused = latentflow(*args)
    assert refused.returncode == 2 and "clips[0].audio_sha256" in refused.stderr
    assert (out / "summary.json").read_bytes() == summary
    kept = latentflow(*args, "--new")
    assert kept.returncode == 0, kept.stderr
    assert [p for p in tmp_path.iterdir() if p.name.startswith("report-")]


def test_weights_digest_is_cached_and_follows_weight_changes():
    import torch

    from latentflow_fast.fingerprint import weights_digest
    from latentflow_fast.models.tiny import build_tiny_model

    torch.manual_seed(0)
    model = build_tiny_model()
    first = weights_digest(model)
    assert weights_digest(model) == first and len(first) == 64
    with torch.no_grad():
        next(model.parameters())[0].add_(1e-6)  # an in-place update bumps the version counter
    assert weights_digest(model) != first
    torch.manual_seed(0)
    assert weights_digest(build_tiny_model()) == first  # same weights, another object: same digest
