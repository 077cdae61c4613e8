"""Exact sweeps over single-threaded worker processes (ProbeEngine(workers=N), `latentflow sweep --workers`):
bitwise the table of an in-process run for any worker count, batch size, probe order and sharding;
resumable after a kill with another worker count; clear refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from latentflow_fast.probe import ProbeEngine, ResultStore
from latentflow_fast.probe.workers import default_workers

from engine_fixtures import mixed_probes, save_small_model, small_clip, small_model

STEPS = 2


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = small_model()
    engine = ProbeEngine(model, time_bins=4)
    clip = small_clip(0)
    traj = engine.trajectory(clip, steps=STEPS, name="clean")
    engine.trajectory(clip, steps=STEPS, prompt=clip.meta["other_prompt"], name="other")
    yield model, engine, traj
    torch.set_num_threads(threads)


def _failing_end_metrics(target, residual, traj):
    raise RuntimeError("boom in a worker")


def _by_key(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["clip_id", "probe_id"], kind="stable").reset_index(drop=True)


def test_worker_pools_give_the_in_process_table_bitwise(setup, tmp_path):
    model, engine, traj = setup
    probes = mixed_probes(engine.sites)
    single = engine.sweep(traj, probes, batch_size=5, progress=False)
    with ProbeEngine(model, time_bins=4, workers=2) as pooled:
        pooled.runs = dict(engine.runs)
        # no store: the rows come back in the in-process order, whatever order the probes came in
        same_order = pooled.sweep(traj, probes, batch_size=3, progress=False)
        pd.testing.assert_frame_equal(single, same_order, check_exact=True)
        reversed_ = pooled.sweep(traj, probes[::-1], batch_size=7, progress=False)
        pd.testing.assert_frame_equal(_by_key(single), _by_key(reversed_), check_exact=True)
        assert pooled._pool is not None and len(pooled._pool.processes) == 2  # the pool is kept between sweeps
        # the second sweep named the trajectories the workers already held instead of sending them again
        held = [ref() for ref in pooled._pool.trajectories.sent.values()]
        assert any(t is traj for t in held) and any(t is engine.runs["other"] for t in held)
        # an error in a worker reaches the caller with its type and message, and stops the pool
        with pytest.raises(RuntimeError, match="boom in a worker"):
            pooled.sweep(traj, probes, end_effect=True, end_metrics=_failing_end_metrics, progress=False)
        assert not pooled._pool.alive()
    assert pooled._pool is None  # closed on leaving the block
    # three workers (another sharding) writing a store, with a fourth of the probes already stored by an
    # in-process run: nothing recomputed twice, the same table
    store = ResultStore(tmp_path / "store")
    engine.sweep(traj, probes[: len(probes) // 4], store=store, batch_size=4, progress=False)
    with ProbeEngine(model, time_bins=4, workers=3) as pooled:
        pooled.runs = dict(engine.runs)
        stored = pooled.sweep(traj, probes, store=store, batch_size=2, progress=False)
    ranks = {p.name.split("-")[1] for p in store.shard_paths()}
    assert ranks == {"r000", "r001", "r002"}, ranks
    reference = engine.sweep(traj, probes, store=ResultStore(tmp_path / "reference"), batch_size=5, progress=False)
    assert len(reference) == len(probes)
    pd.testing.assert_frame_equal(reference, stored, check_exact=True)  # (stores return rows sorted by key)


def test_unpicklable_end_metrics_and_bad_worker_counts_are_refused(setup):
    model, engine, traj = setup
    local = 3

    def closure(target, residual, traj):
        return [{"x": local}] * target.shape[0]

    with ProbeEngine(model, time_bins=4, workers=2) as pooled:
        with pytest.raises(ValueError, match="end_metrics.*picklable"):
            pooled.sweep(traj, mixed_probes(engine.sites)[:2], end_effect=True, end_metrics=closure, progress=False)
        assert pooled._pool is None  # refused before any worker started
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers"):
            ProbeEngine(model, workers=bad)


def test_protocol_end_metrics_are_picklable():
    import pickle

    from latentflow_fast.protocol.effects import EndMetrics

    metrics = EndMetrics(torch.ones(8), None, None, None, {"group": "a"})
    again = pickle.loads(pickle.dumps(metrics))
    assert again.constant == {"group": "a"} and torch.equal(again.clean_wave, metrics.clean_wave)


def test_cli_worker_defaults():
    from latentflow_fast.cli import checks

    assert checks.workers("sweep", None, "cpu", distributed=False) == default_workers() >= 1
    assert checks.workers("sweep", None, "cpu", distributed=True) == 1
    assert checks.workers("sweep", None, "cuda", distributed=False) == 1
    with pytest.raises(SystemExit, match="--workers 2: under torchrun"):
        checks.workers("sweep", 2, "cpu", distributed=True)
    with pytest.raises(SystemExit, match="--workers 2: worker processes are for CPU"):
        checks.workers("probe", 2, "cuda", distributed=False)


SWEEP = [sys.executable, "-m", "latentflow_fast.cli", "sweep", "--steps", "2", "--evaluations", "all",
         "--clip-seconds", "0.25", "--no-progress"]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_killed_worker_sweep_resumes_with_another_worker_count(tmp_path):
    model_dir = save_small_model(tmp_path / "model")
    killed, complete = tmp_path / "killed", tmp_path / "complete"
    args = SWEEP + ["--model", str(model_dir)]
    env = dict(os.environ)
    proc = subprocess.Popen(args + ["--out", str(killed), "--workers", "2", "--batch-size", "2",
                                    "--pause-per-batch", "0.3"], env=env, start_new_session=True)
    shards = killed / "results"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(shards.glob("part-*.parquet"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # only the main process: its workers must not outlive it
    proc.wait()
    time.sleep(1.0)  # (a worker finishing its batch right now may still store it, whole)
    left = len(list(shards.glob("part-*.parquet")))
    time.sleep(2.0)  # an orphaned worker would still be writing shards (one per 0.3 s batch)
    assert len(list(shards.glob("part-*.parquet"))) == left, "a worker outlived the killed sweep"
    if _group_alive(proc.pid):  # nothing should be left, but never leave a stray process behind
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(args + ["--out", str(killed), "--workers", "1", "--batch-size", "5"], check=True, env=env,
                   timeout=300)
    subprocess.run(args + ["--out", str(complete), "--workers", "2", "--batch-size", "3"], check=True, env=env,
                   timeout=300)
    resumed = ResultStore(shards, rank=0).load()
    full = ResultStore(complete / "results", rank=0).load()
    assert left >= 3
    assert len(resumed) == len(full) and len(full) > left * 2  # the kill left work to do
    pd.testing.assert_frame_equal(resumed, full, check_exact=True)
