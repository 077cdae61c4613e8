"""Sharded sweeps under torchrun (gloo on CPU): same table as one process, resumable after a kill,
refused when ranks disagree on the configuration."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from latentflow_fast.models.loading import save_tiny_format
from latentflow_fast.models.tiny import DEFAULT_TINY_CONFIG, build_tiny_model
from latentflow_fast.probe import ResultStore

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
SWEEP = ["-m", "latentflow_fast.cli", "sweep", "--steps", "2", "--evaluations", "all", "--clip-seconds", "0.25",
         "--threads", "1", "--no-progress", "--batch-size", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = copy.deepcopy(DEFAULT_TINY_CONFIG)
    cfg["model"] = dict(dim=32, n_heads=2, n_layers=2)
    return save_tiny_format(build_tiny_model(cfg), cfg, tmp_path_factory.mktemp("model"))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _torchrun(nproc: int) -> list:
    return TORCHRUN + ["--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", _free_port()]


def test_two_ranks_give_the_single_process_table(model_dir, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    subprocess.run([sys.executable] + SWEEP + ["--model", str(model_dir), "--out", str(single)],
                   check=True, env=_env(), timeout=300)
    subprocess.run(_torchrun(2) + SWEEP + ["--model", str(model_dir), "--out", str(sharded)],
                   check=True, env=_env(), timeout=300)
    ranks = {p.name.split("-")[1] for p in ResultStore(sharded / "results", rank=0).shard_paths()}
    assert ranks == {"r000", "r001"}, ranks  # both ranks did work
    a = ResultStore(single / "results", rank=0).load()
    b = ResultStore(sharded / "results", rank=0).load()
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_killed_distributed_sweep_resumes_to_the_same_table(model_dir, tmp_path):
    killed, complete = tmp_path / "killed", tmp_path / "complete"
    args = SWEEP + ["--model", str(model_dir)]
    proc = subprocess.Popen(_torchrun(2) + args + ["--out", str(killed), "--pause-per-batch", "0.3"],
                            env=_env(), start_new_session=True)
    shards = killed / "results"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(shards.glob("part-*.parquet"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher dies; torchrun's ranks (own sessions) die with it
    proc.wait()
    left = len(list(shards.glob("part-*.parquet")))
    time.sleep(2.0)  # a surviving rank would still be writing shards (one per 0.3 s batch)
    assert len(list(shards.glob("part-*.parquet"))) == left, "a rank outlived its killed launcher"
    subprocess.run(_torchrun(2) + args + ["--out", str(killed)], check=True, env=_env(), timeout=300)
    subprocess.run(_torchrun(2) + args + ["--out", str(complete)], check=True, env=_env(), timeout=300)
    resumed = ResultStore(shards, rank=0).load()
    full = ResultStore(complete / "results", rank=0).load()
    assert 3 <= left < len(list((complete / "results").glob("part-*.parquet"))) + 1
    pd.testing.assert_frame_equal(resumed, full, check_exact=True)


MISMATCH = textwrap.dedent("""
    import sys, torch
    from latentflow_fast.models import load_model
    from latentflow_fast.probe import ProbeEngine, ResultStore, Clip, Probe, distributed
    distributed.init_from_env()
    torch.set_num_threads(1)
    engine = ProbeEngine(load_model(sys.argv[1]))
    clip = Clip("c", torch.randn(4000) * 0.1, 16000, "sine tone")
    traj = engine.trajectory(clip, steps=1)
    heads = (0,) if distributed.rank() == 0 else (1,)  # rank 1 asks for another probe set
    try:
        engine.sweep(traj, [Probe("layers.0.self_attn", "head_ablation", heads=heads)],
                     store=ResultStore(sys.argv[2]), progress=False)
    except ValueError as exc:
        print("REFUSED:", exc)
        sys.exit(3)
""")


def test_ranks_with_different_configurations_are_refused(model_dir, tmp_path):
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH)
    result = subprocess.run(_torchrun(2) + [str(script), str(model_dir), str(tmp_path / "out")],
                            env=_env(), timeout=300, capture_output=True, text=True)
    assert result.returncode != 0
    assert "REFUSED: distributed sweep refused" in result.stdout and "probes" in result.stdout
    assert not list((tmp_path / "out").glob("part-*.parquet"))
