import re
import numpy as np
import pytest
import soundfile as sf

from latentflow_fast.cli import main
from latentflow_fast.data import make_mixture


def test_demo_writes_mixture_stems_and_outputs(tmp_path, capsys):
    assert main(["separate", "--demo", "--steps", "2", "--out-dir", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.endswith(".mixture.wav") for n in names)
    assert any(".reference." in n for n in names)
    target = next(tmp_path.glob("*.target.wav"))
    residual = next(tmp_path.glob("*.residual.wav"))
    t, sr = sf.read(target)
    r, _ = sf.read(residual)
    assert sr == 16_000 and t.shape == r.shape == (32_000,)
    assert "si_sdri_db" in capsys.readouterr().out


def test_wav_file_round_trip_at_another_rate_and_stereo(tmp_path):
    m = make_mixture(1_000_000_123)
    stereo = np.stack([m.mixture, m.mixture], axis=1)
    src = tmp_path / "in.wav"
    sf.write(src, stereo, 16_000)
    flac = tmp_path / "in.flac"
    sf.write(flac, m.mixture[::2], 8_000)  # another sample rate, mono FLAC
    out = tmp_path / "out"
    assert main(["separate", str(src), "--prompt", m.prompt, "--steps", "2", "--out-dir", str(out)]) == 0
    t, sr = sf.read(out / "in.target.wav")
    assert sr == 16_000 and t.shape == (32_000,) and np.isfinite(t).all()
    assert main(["separate", str(flac), "--prompt", m.prompt, "--steps", "2", "--out-dir", str(out)]) == 0
    t, sr = sf.read(out / "in.target.flac")
    assert sr == 8_000 and t.shape == (16_000,)


def test_bad_usage_exits_with_message(tmp_path, capsys):
    assert main(["separate", "--out-dir", str(tmp_path)]) == 2  # neither file nor --demo
    assert main(["separate", "--demo", "--prompt", "violin", "--steps", "1", "--out-dir", str(tmp_path)]) == 2
    assert re.search("vocabulary", capsys.readouterr().err)
    assert main(["separate", str(tmp_path / "missing.wav"), "--prompt", "chirp"]) == 2
    assert re.search("no such file", capsys.readouterr().err)
