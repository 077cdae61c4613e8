import re
"""`latentflow probe --quick`: writes summary.json, report.html and PNGs; a rerun resumes to the same summary."""

import copy
import json

import pytest
import torch

from latentflow_fast.cli import main
from latentflow_fast.models.tiny import DEFAULT_TINY_CONFIG, build_tiny_model
from training.flow_matching import save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random small model in the tiny model's on-disk format (the trained weights may not exist yet)."""
    torch.manual_seed(0)
    cfg = copy.deepcopy(DEFAULT_TINY_CONFIG)
    cfg["model"] = dict(dim=32, n_heads=2, n_layers=3)
    path = tmp_path_factory.mktemp("model")
    save_model(build_tiny_model(cfg), cfg, path)
    return path


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()  # the CLI's --threads sets the process-wide value
    yield
    torch.set_num_threads(threads)


def test_quick_probe_writes_report_and_resumes(model_dir, tmp_path, capsys, keep_threads):
    out = tmp_path / "report"
    args = ["probe", "--quick", "--clips", "1", "--seconds", "0.125", "--model", str(model_dir),
            "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "p6" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["experiments"]) == ["p0", "p1", "p2", "p3", "p4", "p5", "p6"]
    assert summary["experiments"]["p0"]["summary"]["bitwise_equal"] is True
    assert summary["experiments"]["p4"]["summary"]["identity_control_max_abs_damage"] == 0
    html = (out / "report.html").read_text()
    assert "Limitations of this run" in html and "n = 1 clip." in html and "Limitations of this run:" in printed
    assert any(item["topic"] == "sample size" for item in summary["limitations"])
    pngs = sorted((out / "figures").glob("*.png"))
    assert pngs and all(p.stat().st_size > 0 for p in pngs)
    for fig in summary["figures"]:
        assert (out / fig["path"]).is_file() and fig["path"] in html and fig["caption"]
    assert any((out / "results" / "p6").glob("part-*.parquet"))
    first = (out / "summary.json").read_bytes()
    shards = sorted(p.name for p in (out / "results").rglob("part-*.parquet"))
    assert main(args) == 0  # resume: every row is stored, nothing is recomputed
    assert (out / "summary.json").read_bytes() == first
    assert sorted(p.name for p in (out / "results").rglob("part-*.parquet")) == shards


def test_probe_refuses_bad_arguments(model_dir, tmp_path, capsys):
    assert main(["probe", "--experiments", "p9", "--out", str(tmp_path / "x"), "--model", str(model_dir)]) == 2
    assert re.search("experiments", capsys.readouterr().err)
    assert main(["probe", "--prompt", "chirp", "--out", str(tmp_path / "y"), "--model", str(model_dir)]) == 2
    assert re.search("--audio", capsys.readouterr().err)
    assert main(["probe", "--steps", "0", "--out", str(tmp_path / "z"), "--model", str(model_dir)]) == 2
    assert re.search("steps", capsys.readouterr().err)
