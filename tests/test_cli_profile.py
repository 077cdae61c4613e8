import re
"""`latentflow profile` without nsys: the torch profiler trace holds the stable NVTX/record ranges."""

import json
import shutil

import pytest

from latentflow_fast.cli import main

from engine_fixtures import save_small_model


@pytest.mark.skipif(shutil.which("nsys") is not None, reason="nsys present: auto would pick Nsight")
def test_profile_writes_a_trace_with_named_ranges(tmp_path, capsys):
    model = save_small_model(tmp_path / "model")
    out = tmp_path / "prof"
    status = main(["profile", "--out", str(out), "--", "latentflow", "sweep", "--model", str(model), "--steps", "1",
                   "--evaluations", "0", "--kinds", "head_ablation", "--clip-seconds", "0.25", "--no-progress",
                   "--out", str(tmp_path / "sweep")])
    assert status == 0
    names = {event.get("name", "") for event in json.loads((out / "latentflow_trace.json").read_text())["traceEvents"]}
    for prefix in ("latentflow.evaluation.", "latentflow.layer.", "latentflow.site.layers.0.self_attn",
                   "latentflow.probe_batch.", "latentflow.probed_attention."):
        assert any(n.startswith(prefix) for n in names), prefix
    assert "Chrome trace" in capsys.readouterr().out


def test_profile_needs_a_command(capsys):
    assert main(["profile", "--tool", "torch"]) == 2
    assert re.search("give the command", capsys.readouterr().err)
