"""Smoke test of benchmarks/dropin_peers.py on the torch.nn models (no peers needed): the table runs, trace's
outputs equal the plain-hook baseline's exactly, and the per-probe overhead mode prints every loop form."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dropin_peers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("dropin_peers_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def run(bench, monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["dropin_peers.py", *argv])
    bench.main()
    return capsys.readouterr().out


def test_table_rows_and_exact_agreement(bench, monkeypatch, capsys):
    out = run(bench, monkeypatch, capsys, "--models", "gpt,bert", "--tokens", "8", "--layers", "2", "--dim", "16",
              "--rounds", "1", "--variants", "trace batched,trace loop,hooks loop")
    rows = [line.split() for line in out.splitlines() if re.match(r"(gpt|bert)\s+8 ", line)]
    labels = {(r[0], f"{r[2]} {r[3]}") for r in rows}
    assert labels == {(m, v) for m in ("gpt", "bert") for v in ("hooks batched", "trace batched", "trace loop",
                                                                 "hooks loop")}
    for r in rows:
        assert float(r[4]) > 0  # probes/s
        if r[2] == "trace" and r[3] == "batched":
            assert float(r[-1]) == 0.0  # the same SDPA call, then the ablated slices scaled: bit-identical


def test_overhead_mode_prints_each_loop_form(bench, monkeypatch, capsys):
    out = run(bench, monkeypatch, capsys, "--overhead", "3", "--models", "gpt", "--tokens", "4", "--layers", "2",
              "--dim", "16")
    rows = [line.split() for line in out.splitlines() if line.startswith("gpt ")]
    assert {f"{r[2]} {r[3]}" for r in rows} >= {"trace loop", "hooks loop"}
    assert all(float(r[4]) > 0 for r in rows)  # the forward's own time


def test_a_negative_pair_count_is_refused_by_name(bench, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        run(bench, monkeypatch, capsys, "--overhead", "-2")
    assert "--overhead must be" in capsys.readouterr().err
