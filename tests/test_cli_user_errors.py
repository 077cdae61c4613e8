"""Ordinary mistakes give one line naming the argument and exit status 2, before any computation, and
leave nothing on disk; Ctrl-C prints one line. Runs `latentflow` in a subprocess, as a user would."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cli_helpers import ROOT, latentflow, leftovers, save_small_tiny_model, write_wav


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    good = save_small_tiny_model(root / "good")
    (root / "file.bin").write_bytes(b"not a model")
    config_only = root / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text((good / "config.json").read_text())
    bad_json = root / "bad_json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    (bad_json / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    truncated = root / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((good / "config.json").read_text())
    (truncated / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:1000])
    return {"missing": root / "nope", "file": root / "file.bin", "config_only": config_only,
            "bad_json": bad_json, "truncated": truncated, "good": good}


def _one_line_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("kind", ["missing", "file", "config_only", "bad_json", "truncated"])
def test_separate_bad_model_folder(broken_models, tmp_path, kind):
    out = tmp_path / "out"
    result = latentflow("separate", "--demo", "--steps", "1", "--model", broken_models[kind], "--out-dir", out)
    _one_line_error(result, "--model")
    assert leftovers(out) == []  # --demo's mixture and references are written only after success


def test_sweep_bad_model_folder(broken_models, tmp_path):
    out = tmp_path / "sweep"
    result = latentflow("sweep", "--model", broken_models["truncated"], "--out", out, "--no-progress")
    _one_line_error(result, "--model", "cannot load")
    assert leftovers(out) == []


@pytest.mark.parametrize("content", [b"", b"hello, this is text\n" * 20, b"RIFF\x10\x00\x00\x00WAVEfmt garbage"])
def test_separate_unreadable_audio(tmp_path, content):
    bad = tmp_path / "mix.wav"
    bad.write_bytes(content)
    result = latentflow("separate", bad, "--prompt", "chirp", "--steps", "1", "--out-dir", tmp_path / "out")
    _one_line_error(result, "input", "cannot read")
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("args, needle", [
    (["--threads", "0"], "--threads"),
    (["--demo-seed", "-5"], "--demo-seed"),
    (["--seed", str(10**23)], "--seed"),
    (["--steps", "0"], "--steps"),
    (["--prompt", "  "], "--prompt"),
])
def test_separate_bad_numbers(tmp_path, args, needle):
    out = tmp_path / "out"
    _one_line_error(latentflow("separate", "--demo", *args, "--out-dir", out), needle)
    assert leftovers(out) == []


def test_separate_output_folder_is_a_file_or_unwritable(tmp_path):
    target = tmp_path / "taken"
    target.write_text("x")
    _one_line_error(latentflow("separate", "--demo", "--steps", "1", "--out-dir", target), "--out-dir", "not a folder")
    _one_line_error(latentflow("separate", "--demo", "--steps", "1", "--out-dir", target / "sub"), "--out-dir")
    if os.geteuid() != 0:  # root may write anywhere: this half cannot fail as root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _one_line_error(latentflow("separate", "--demo", "--steps", "1", "--out-dir", locked / "o"), "not writable")


@pytest.mark.parametrize("args, needle", [
    (["--kinds", ""], "--kinds"),
    (["--kinds", "bogus"], "--kinds"),
    (["--sites"], "--sites"),
    (["--sites", ""], "--sites"),
    (["--sites", "layers.99.*"], "--sites"),
    (["--evaluations", "0,x"], "--evaluations"),
    (["--evaluations", "999"], "--evaluations"),
    (["--threads", "0"], "--threads"),
    (["--seed", "-1"], "--seed"),
    (["--backend", "nonsense"], "--backend"),
    (["--audio", "missing.wav", "--prompt", "chirp"], "--audio"),
])
def test_sweep_bad_arguments(tmp_path, args, needle):
    out = tmp_path / "sweep"
    _one_line_error(latentflow("sweep", *args, "--out", out, "--no-progress"), needle)
    assert leftovers(out) == []


def test_probe_bad_arguments(tmp_path):
    out = tmp_path / "report"
    _one_line_error(latentflow("probe", "--threads", "0", "--out", out), "--threads")
    _one_line_error(latentflow("probe", "--backend", "nonsense", "--out", out), "--backend")
    text = tmp_path / "t.wav"
    text.write_text("not audio")
    _one_line_error(latentflow("probe", "--audio", text, "--prompt", "chirp", "--out", out), "--audio")
    assert leftovers(out) == []


def test_demo_writes_nothing_when_the_prompt_is_refused(tmp_path):
    out = tmp_path / "out"
    result = latentflow("separate", "--demo", "--steps", "1", "--prompt", "violin", "--out-dir", out)
    assert result.returncode == 2 and "vocabulary" in result.stderr
    assert leftovers(out) == []


def test_ctrl_c_prints_one_line(broken_models, tmp_path):
    out = tmp_path / "sweep"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "latentflow_fast.cli", "sweep", "--model", str(broken_models["good"]), "--steps", "2",
         "--clip-seconds", "0.125", "--sites", "layers.0.self_attn", "--kinds", "uniform", "--batch-size", "1",
         "--pause-per-batch", "2", "--workers", "1", "--no-progress", "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A suite started in the background of a non-interactive shell inherits SIGINT = ignored, and Python
        # then installs no KeyboardInterrupt handler in the child: give the child the default disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not any(out.glob("results/part-*.parquet")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines == ["latentflow sweep: interrupted (rerun the same command to resume)"], err
    assert json.loads((out / "results" / "manifest.json").read_text())["steps"] == 2


def test_separate_refuses_input_beyond_the_models_limit_and_notes_long_input(tmp_path):
    too_long = write_wav(tmp_path / "long.wav", seconds=21.0, rate=8000)
    result = latentflow("separate", too_long, "--prompt", "chirp", "--out-dir", tmp_path / "out")
    _one_line_error(result, "input", "21.0 s is longer than the model's limit of 20 s")
    assert leftovers(tmp_path / "out") == []
    longish = write_wav(tmp_path / "longish.wav", seconds=4.5, rate=8000)
    result = latentflow("separate", longish, "--prompt", "chirp", "--steps", "1", "--out-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "trained on clips of at most 2 s" in result.stdout
