"""run_protocol(workers=2): the clips split over single-threaded processes (docs/design.md, section 6) store
bitwise the rows one process stores, and the summaries agree (P6's measured wall times aside)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from latentflow_fast.protocol.run import quick_config, run_protocol

@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


EXPERIMENTS = ("p0", "p3", "p4")  # P4 runs in the second phase, after P3's split is summarised


def _rows(folder, experiment):
    frame = pd.concat([pd.read_parquet(p) for p in sorted((folder / "results" / experiment).glob("part-*.parquet"))])
    return frame.sort_values(["clip_id", "probe_id"], kind="stable").reset_index(drop=True), \
        sorted(p.name for p in (folder / "results" / experiment).glob("part-*.parquet"))


def test_clip_sharded_processes_store_the_same_rows_and_summary(tmp_path, keep_threads):
    config = quick_config(model="tiny", experiments=EXPERIMENTS, num_clips=3)
    one = run_protocol(config, tmp_path / "one", progress=False, clip_seconds=0.25, workers=1)
    two = run_protocol(config, tmp_path / "two", progress=False, clip_seconds=0.25, workers=2)
    for experiment in EXPERIMENTS:
        rows_one, shards_one = _rows(tmp_path / "one", experiment)
        rows_two, shards_two = _rows(tmp_path / "two", experiment)
        pd.testing.assert_frame_equal(rows_one, rows_two, check_exact=True)
        assert {name.split("-")[1] for name in shards_two} == {"r000", "r001"}  # both processes wrote rows
        assert {name.split("-")[1] for name in shards_one} == {"r000"}
    assert json.dumps(one["experiments"], sort_keys=True) == json.dumps(two["experiments"], sort_keys=True)
    assert not list((tmp_path / "two").glob(".protocol-process-*.err"))
