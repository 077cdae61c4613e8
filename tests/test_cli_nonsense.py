"""Nonsense arguments are refused before any work, and loud audio is never silently clipped."""

import numpy as np
import soundfile as sf

from cli_helpers import latentflow, leftovers


def test_sweep_refuses_negative_clip_seconds_and_zero_clips(tmp_path):
    out = tmp_path / "sweep"
    for args, name in ((["--clip-seconds", "-1"], "--clip-seconds"), (["--clip-seconds", "nan"], "--clip-seconds"),
                       (["--clips", "0"], "--clips")):
        result = latentflow("sweep", *args, "--out", out, "--no-progress")
        assert result.returncode == 2, result.stderr
        assert name in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert leftovers(out) == []


def test_probe_refuses_empty_experiments_and_bad_seconds(tmp_path):
    out = tmp_path / "report"
    for args, name in ((["--experiments", ""], "--experiments"), (["--experiments", " , "], "--experiments"),
                       (["--seconds", "0"], "--seconds")):
        result = latentflow("probe", *args, "--out", out, "--no-progress")
        assert result.returncode == 2 and name in result.stderr and "Traceback" not in result.stderr
    assert leftovers(out) == []


def test_loud_output_is_written_as_float_wav_or_normalised_flac(tmp_path, capsys):
    from latentflow_fast.cli.separate import _write

    wave = np.sin(np.linspace(0, 60, 1600)).astype(np.float32) * 6.0
    _write(tmp_path / "loud.wav", wave, 16_000)
    back, _ = sf.read(tmp_path / "loud.wav", dtype="float32")
    assert sf.info(str(tmp_path / "loud.wav")).subtype == "FLOAT"
    np.testing.assert_array_equal(back, wave)  # not one sample clipped
    _write(tmp_path / "loud.flac", wave, 16_000)
    back, _ = sf.read(tmp_path / "loud.flac", dtype="float32")
    assert abs(np.abs(back).max() - 1.0) < 1e-3 and np.abs(back).max() <= 1.0
    printed = capsys.readouterr().out
    assert "32-bit float" in printed and "scaled by 1/6.00" in printed
    _write(tmp_path / "quiet.wav", wave / 12, 16_000)
    assert sf.info(str(tmp_path / "quiet.wav")).subtype == "PCM_16"
