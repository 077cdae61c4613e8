"""The sweep engine: exact zero for identity probes, independence of batching, resumable storage."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from latentflow_fast.probe import Probe, ProbeEngine, ResultStore, probe_grid
from latentflow_fast.probe.invariance import batch_invariant_linear

from engine_fixtures import mixed_probes, small_clip, small_model

STEPS = 2  # midpoint: 4 evaluations


@pytest.fixture(scope="module")
def setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _setup()
    torch.set_num_threads(threads)  # no process-wide side effect left behind


def _setup():
    model = small_model()
    engine = ProbeEngine(model, time_bins=4)
    clip = small_clip(0)
    traj = engine.trajectory(clip, steps=STEPS, capture=("entropy", "segment_mass"), name="clean")
    engine.trajectory(clip, steps=STEPS, prompt=clip.meta["other_prompt"], name="other")
    return engine, traj


def test_batch_invariant_linear_rows_do_not_depend_on_batch():
    torch.manual_seed(0)
    w, b = torch.randn(48, 40), torch.randn(48)
    x = torch.randn(1, 37, 40)
    alone = batch_invariant_linear(x, w, b)
    for rows in (2, 5, 16):
        batch = torch.cat([x, torch.randn(rows - 1, 37, 40)])
        assert torch.equal(batch_invariant_linear(batch, w, b)[:1], alone)
    torch.testing.assert_close(alone, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_trajectory_matches_the_sampler(setup):
    engine, traj = setup
    result = engine.model.separate(traj.clip.mixture, traj.clip.sample_rate, traj.clip.prompt, steps=STEPS)
    assert traj.num_evaluations == 2 * STEPS
    # The engine runs every site through the probed operator; the plain path uses SDPA: same within fp32.
    torch.testing.assert_close(traj.final, result.latent, rtol=1e-4, atol=1e-4)
    assert traj.captures["layers.0.self_attn"]["segment_mass"].shape[:2] == (4, 2)
    mass = traj.captures["layers.1.self_attn"]["segment_mass"].sum(-1)
    torch.testing.assert_close(mass, torch.ones_like(mass), rtol=1e-5, atol=1e-5)


def test_identity_probes_have_exactly_zero_effect(setup):
    engine, traj = setup
    identity = [
        Probe("layers.0.self_attn", "none", evaluation=1),
        Probe("layers.1.self_attn", "head_ablation", value=1.0, evaluation=2, window=None),
        Probe("layers.0.cross_attn", "output_patch", source="clean", evaluation=0, window=None),
        Probe("layers.1.cross_attn", "additive_swap", source="clean", evaluation=1, window=None),
        Probe("layers.0.cross_attn", "routing_swap", source="clean", evaluation=3, window=None),
        Probe("layers.1.self_attn", "temperature", value=1.0, evaluation=0, window=None),
    ]
    df = engine.sweep(traj, identity, end_effect=True, progress=False, batch_size=4)
    for column in ("local_effect", "end_latent_change", "end_mrstft_to_clean", "end_logmel_to_clean", "end_delta_si_sdr"):
        assert (df[column] == 0).all(), (column, df[column].tolist())
    assert all(max(frames) == 0 for frames in df["local_effect_frames"])


def test_real_probes_have_nonzero_effect(setup):
    engine, traj = setup
    probes = mixed_probes(engine.sites, evaluations=(1,))
    real = [p for p in probes if p.intervention != "none"]
    df = engine.sweep(traj, real, end_effect=True, progress=False)
    assert len(df) == len(real)
    assert (df["local_effect"] > 0).all()
    assert (df["end_latent_change"] > 0).all()


def test_results_do_not_depend_on_batching(setup):
    engine, traj = setup
    probes = mixed_probes(engine.sites)
    a = engine.sweep(traj, probes, end_effect=True, progress=False, batch_size=3)
    b = engine.sweep(traj, list(reversed(probes)), end_effect=True, progress=False, batch_size=11)
    key = ["probe_id"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True),
                                  check_exact=True)


def test_out_of_memory_halves_the_batch_and_retries(setup, monkeypatch):
    engine, traj = setup
    probes = mixed_probes(engine.sites, evaluations=(2,))
    expected = engine.sweep(traj, probes, progress=False, batch_size=8)
    original = engine.run_batch
    seen = []

    def limited(traj_, evaluation, batch, *args, **kwargs):
        seen.append(len(batch))
        if len(batch) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(traj_, evaluation, batch, *args, **kwargs)

    monkeypatch.setattr(engine, "run_batch", limited)
    got = engine.sweep(traj, probes, progress=False, batch_size=8)
    assert max(seen) == 8 and seen[-1] <= 4
    pd.testing.assert_frame_equal(expected.sort_values("probe_id").reset_index(drop=True),
                                  got.sort_values("probe_id").reset_index(drop=True), check_exact=True)


def test_store_resumes_without_recomputing(setup, tmp_path, monkeypatch):
    engine, traj = setup
    probes = mixed_probes(engine.sites, evaluations=(0, 3))
    store = ResultStore(tmp_path, fingerprint={"test": 1})
    first = engine.sweep(traj, probes, store=store, progress=False, batch_size=8)
    assert len(first) == len(probes) and not first.duplicated(["clip_id", "probe_id"]).any()

    def fail(*args, **kwargs):
        raise AssertionError("a stored probe was run again")

    monkeypatch.setattr(engine, "run_batch", fail)
    again = engine.sweep(traj, probes, store=ResultStore(tmp_path, fingerprint={"test": 1}), progress=False)
    pd.testing.assert_frame_equal(first, again, check_exact=True)
    with pytest.raises(ValueError, match=r"other settings \(differs in: test\)"):
        ResultStore(tmp_path, fingerprint={"test": 2})


def test_stale_manifest_without_results_is_replaced(tmp_path):
    # A run that failed before storing anything must not block a corrected rerun.
    ResultStore(tmp_path, fingerprint={"backend": "nonsense"})
    store = ResultStore(tmp_path, fingerprint={"backend": "auto"})
    assert '"auto"' in (tmp_path / "manifest.json").read_text()
    store.write_shard([{"clip_id": "c", "probe_id": "p", "x": 1.0}])
    with pytest.raises(ValueError, match=r"differs in: backend\b"):
        ResultStore(tmp_path, fingerprint={"backend": "cpu"})
    (tmp_path / "manifest.json").unlink()  # results whose settings are unknown are not mixed either
    with pytest.raises(ValueError, match="settings are unknown"):
        ResultStore(tmp_path, fingerprint={"backend": "auto"})
    assert len(ResultStore(tmp_path).load()) == 1  # without a fingerprint: plain reading still works


def test_bad_probes_are_refused(setup):
    engine, traj = setup
    with pytest.raises(ValueError, match="unknown site"):
        engine.sweep(traj, [Probe("layers.9.self_attn", "head_ablation")], progress=False)
    with pytest.raises(ValueError, match="head"):
        engine.sweep(traj, [Probe("layers.0.self_attn", "head_ablation", heads=(7,))], progress=False)
    with pytest.raises(ValueError, match="evaluation"):
        engine.sweep(traj, [Probe("layers.0.self_attn", "head_ablation", evaluation=99)], progress=False)
    with pytest.raises(ValueError, match="source run"):
        engine.sweep(traj, [Probe("layers.0.cross_attn", "output_patch", source="nope")], progress=False)
    with pytest.raises(ValueError, match="unknown site"):
        engine.sweep(traj, [Probe("decoder.*", "head_ablation")], progress=False)
    with pytest.raises(ValueError, match="matches no site"):
        probe_grid("decoder.*", engine.sites, {"intervention": "head_ablation"}, evaluations=[0])
    with pytest.raises(ValueError, match="intervention"):
        Probe("layers.0.self_attn", "explode")


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from engine_fixtures import small_model, small_clip, mixed_probes
    from latentflow_fast.probe import ProbeEngine, ResultStore
    torch.set_num_threads(1)
    engine = ProbeEngine(small_model(), time_bins=4)
    clip = small_clip(0)
    traj = engine.trajectory(clip, steps=2, name="clean")
    engine.trajectory(clip, steps=2, prompt=clip.meta["other_prompt"], name="other")
    store = ResultStore(sys.argv[1], fingerprint={{"kill": 1}})
    slow = float(sys.argv[2])
    original = engine.run_batch
    def paced(*a, **k):
        rows = original(*a, **k)
        time.sleep(slow)
        return rows
    engine.run_batch = paced
    engine.sweep(traj, mixed_probes(engine.sites), store=store, progress=False, batch_size=5)
""")


def test_killed_sweep_resumes_with_no_lost_or_duplicated_rows(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    killed, complete = tmp_path / "killed", tmp_path / "complete"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "0.5"])
    deadline = time.time() + 240
    while time.time() < deadline and len(list(killed.glob("part-*.parquet"))) < 2:
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    partial = len(list(killed.glob("part-*.parquet")))
    assert partial >= 2, "the sweep never wrote a shard"
    subprocess.run([sys.executable, str(script), str(killed), "0"], check=True)
    subprocess.run([sys.executable, str(script), str(complete), "0"], check=True)
    resumed = ResultStore(killed).load()
    full = ResultStore(complete).load()
    assert len(list(killed.glob("*.tmp"))) == 0
    pd.testing.assert_frame_equal(resumed, full, check_exact=True)


def test_exact_mode_is_batch_invariant_with_several_threads(setup):
    """torch's multi-threaded element-wise kernels split at batch-dependent offsets; exact mode avoids it."""
    engine, traj = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for rows in (3, 17):
            probes = [Probe("layers.0.cross_attn", "head_ablation", value=0.01 * i) for i in range(rows - 1)]
            probes.append(Probe("layers.1.self_attn", "none"))
            results = engine.run_batch(traj, 0, probes)
            assert results[-1]["local_effect"] == 0.0
        assert torch.get_num_threads() == 2  # restored after each forward
    finally:
        torch.set_num_threads(threads)


def test_a_pattern_probe_acts_at_every_matching_site_in_one_row(setup):
    engine, traj = setup
    both = Probe("layers.*.self_attn", "head_ablation", evaluation=1)
    singles = [Probe(f"layers.{i}.self_attn", "head_ablation", evaluation=1) for i in (0, 1)]
    df = engine.sweep(traj, [both] + singles, progress=False).set_index("probe_id")
    assert df.loc[both.probe_id, "layer"] == -1 and df.loc[both.probe_id, "site"] == "layers.*.self_attn"
    effects = [df.loc[p.probe_id, "local_effect"] for p in singles]
    assert df.loc[both.probe_id, "local_effect"] not in effects and min(effects) > 0
    # Its effect is its own (not either single-site effect) and the router is left clean.
    assert df.loc[both.probe_id, "local_effect"] > 0
    assert not engine.model.attention_router.handlers  # handlers removed after the sweep


def test_prefix_reuse_gives_the_same_table_and_skips_layers(setup):
    """Batches start at the first layer their probes act at, from the clean run's recorded layer inputs:
    bitwise the same results as full forwards, with fewer layers run."""
    engine, traj = setup
    assert sorted(traj.layer_inputs) == list(range(traj.num_evaluations))
    assert len(traj.layer_inputs[0]) == len(engine.model.transformer.layers)
    probes = mixed_probes(engine.sites, evaluations=(1, 2))
    full = ProbeEngine(engine.model, time_bins=4, prefix_reuse=False)
    full.runs, full.vectors = engine.runs, engine.vectors
    a = engine.sweep(traj, probes, progress=False, end_effect=True)
    b = full.sweep(traj, probes, progress=False, end_effect=True)
    key = ["probe_id"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True),
                                  check_exact=True)
    # a probe at layer 1 runs layer 1 only at its branch evaluation
    ran = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
             for i, layer in enumerate(engine.model.transformer.layers)]
    try:
        engine.run_batch(traj, 2, [Probe("layers.1.cross_attn", "head_ablation", heads=(0,), evaluation=2)])
    finally:
        for h in hooks:
            h.remove()
    assert ran == [1]
    assert engine.first_layer([Probe("layers.*.self_attn", "head_ablation")]) == 0


def test_prefix_cache_respects_its_budget(setup):
    engine, traj = setup
    per_evaluation = sum(x.numel() * x.element_size() for x in traj.layer_inputs[0])
    small = ProbeEngine(engine.model, time_bins=4, prefix_cache_bytes=per_evaluation * 2)
    limited = small.trajectory(traj.clip, steps=STEPS)
    assert sorted(limited.layer_inputs) == [0, 1]
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        ProbeEngine(engine.model, prefix_cache_bytes=-1)


def test_shared_conditioning_is_bitwise_the_per_row_computation(setup):
    """Rows sharing one prompt and one time: conditioning and cross-attention keys/values computed once
    and broadcast give the same bits as computing them for every row."""
    from latentflow_fast.probe.engine import expand_inputs
    from latentflow_fast.probe.invariance import batch_invariant

    engine, traj = setup
    model, inputs = engine.model, traj.inputs
    state = traj.states[1].expand(3, -1, -1).contiguous()
    rows = expand_inputs(inputs, 3)
    with torch.no_grad(), batch_invariant():
        shared = model(state, torch.full((1,), 0.25), inputs.mixture, inputs.text, inputs.text_mask)
        per_row = model(state, torch.full((3,), 0.25), rows.mixture, rows.text, rows.text_mask)
    assert torch.equal(shared, per_row)


def test_model_layers_switching_themselves_give_the_function_modes_bits(setup):
    """The model's own layers compute per row when batch invariance is on (a thread-local flag); the
    TorchFunctionMode that rewrites every F.linear (the fallback for other models) gives the same bits."""
    from latentflow_fast.probe.invariance import layers_switch_themselves

    engine, traj = setup
    assert engine._native_invariance and layers_switch_themselves(engine.model)
    moded = ProbeEngine(engine.model, time_bins=4)
    moded._native_invariance = False  # force the TorchFunctionMode path
    moded.add_run("clean", traj)
    moded.add_run("other", engine.runs["other"])
    probes = [p for p in mixed_probes(engine.sites, evaluations=(1,))][:12]
    a = engine.sweep(traj, probes, progress=False, batch_size=5)
    b = moded.sweep(traj, probes, progress=False, batch_size=5)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    again = moded.trajectory(traj.clip, steps=STEPS, capture=("entropy", "segment_mass"))
    assert all(torch.equal(x, y) for x, y in zip(again.velocities, traj.velocities))
    # outside batch_invariant() the layers are plain nn.Linear / nn.Conv1d
    x = torch.randn(3, 5, engine.model.config.dim)
    layer = engine.model.transformer.layers[0].attention.wq
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_unprobed_sites_run_native_attention_and_stay_exact(setup, monkeypatch):
    """Without captures the clean run uses torch SDPA at every site; in a batch only the rows that
    intervene at a site go through the probed kernel there. Identity rows stay exactly zero, and the
    table does not depend on batching."""
    from latentflow_fast.probe import engine as engine_module

    engine, _ = setup
    plain = ProbeEngine(engine.model, time_bins=4)
    traj = plain.trajectory(engine.runs["clean"].clip, steps=STEPS, cache_heads="*", name="clean")
    plain.trajectory(engine.runs["clean"].clip, steps=STEPS, prompt=engine.runs["other"].inputs.prompts[0],
                     name="other")
    assert traj.kernel_sites == frozenset()
    calls = []
    real_op = engine_module.probed_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape[0])
        return real_op(q, *args, **kwargs)

    monkeypatch.setattr(engine_module, "probed_attention", counting)
    probes = [Probe("layers.1.self_attn", "head_ablation", heads=(0,), evaluation=1),
              Probe("layers.1.self_attn", "none", evaluation=1),
              Probe("layers.1.self_attn", "temperature", value=1.0, evaluation=1)]
    rows = plain.run_batch(traj, 1, probes)
    assert calls == [1]  # one kernel call, for the one intervening row
    assert rows[0]["local_effect"] > 0 and rows[1]["local_effect"] == 0 and rows[2]["local_effect"] == 0
    monkeypatch.setattr(engine_module, "probed_attention", real_op)
    probes = mixed_probes(plain.sites, evaluations=(1, 2))
    a = plain.sweep(traj, probes, end_effect=True, progress=False, batch_size=3)
    b = plain.sweep(traj, list(reversed(probes)), end_effect=True, progress=False, batch_size=11)
    key = ["probe_id"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True),
                                  check_exact=True)
    identity = a[a["intervention"] == "none"]
    assert len(identity) and (identity["local_effect"] == 0).all() and (identity["end_latent_change"] == 0).all()


def test_native_attention_is_batch_invariant_on_this_device():
    """The engine's exactness at unprobed sites rests on this: a row of torch SDPA does not depend on the
    other rows of its batch."""
    from latentflow_fast.models.attention import sdpa

    gen = torch.Generator().manual_seed(0)
    for T, L in ((37, 37), (200, 5)):
        q, k, v = (torch.randn(6, 2, n, 16, generator=gen) for n in (T, L, L))
        mask = torch.rand(6, L, generator=gen) > 0.2
        mask[:, 0] = True
        full = sdpa(q, k, v, mask)
        for i in range(6):
            assert torch.equal(sdpa(q[i:i + 1], k[i:i + 1], v[i:i + 1], mask[i:i + 1]), full[i:i + 1])
        assert torch.equal(sdpa(q[1:4], k[1:4], v[1:4], mask[1:4]), full[1:4])


def test_results_name_the_kind_the_user_asked_for():
    from latentflow_fast.probe import standard_probes

    probes = standard_probes(["layers.0.self_attn", "layers.0.cross_attn"], 2, 3, [0],
                             ("uniform", "text_knockout", "head_ablation"))
    kinds = {p.describe()["probe_kind"] for p in probes}
    assert kinds == {"uniform", "text_knockout", "head_ablation"}
    uniform = next(p for p in probes if p.probe_kind == "uniform")
    assert uniform.describe()["intervention"] == "logit_scale" and uniform.value == 0.0


def test_steering_vectors_are_registered_checked_and_applied(setup):
    """output_bias adds value * vector[head] to the head output: compared with an independent computation
    (the same forward with the bias added by a router handler around plain attention)."""
    from latentflow_fast.models.attention import sdpa

    engine, traj = setup
    hd = engine.model.config.head_dim
    vector = torch.linspace(-1, 1, hd)
    engine.add_vector("ramp", vector)
    assert engine.vectors["ramp"].shape == (engine.num_heads, hd)
    with pytest.raises(ValueError, match="vector must be"):
        engine.add_vector("bad", torch.ones(hd + 1))
    with pytest.raises(ValueError, match="NaN"):
        engine.add_vector("nan", torch.full((hd,), float("nan")))
    probe = Probe("layers.1.self_attn", "output_bias", heads=(1,), value=0.5, source="ramp", evaluation=2)
    row = engine.run_batch(traj, 2, [probe])[0]

    def handler(site, q, k, v, mask):
        out = sdpa(q, k, v, mask)
        out[:, 1] += 0.5 * vector
        return out

    router = engine.model.attention_router
    router.handlers["layers.1.self_attn"] = handler
    try:
        with torch.no_grad():
            expected = engine.model(traj.states[2], torch.full((1,), traj.schedule[2][1]), traj.inputs.mixture,
                                    traj.inputs.text, traj.inputs.text_mask)
    finally:
        router.handlers.clear()
    clean = traj.velocities[2]
    independent = float((expected - clean).norm() / clean.norm())
    assert row["local_effect"] > 0
    assert row["local_effect"] == pytest.approx(independent, rel=1e-3)


def test_batch_invariance_flag_is_per_thread_and_restored():
    """batch_invariant(native=True) switches the model's layers in the calling thread only, and restores."""
    import threading

    from latentflow_fast.models.invariant import batch_invariant_on
    from latentflow_fast.probe.invariance import batch_invariant

    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen["other"] = batch_invariant_on()
        done.set()

    worker = threading.Thread(target=other)
    worker.start()
    with batch_invariant(native=True):
        seen["inside"] = batch_invariant_on()
        with batch_invariant(native=True):
            pass
        seen["nested exit"] = batch_invariant_on()
        inside.set()
        done.wait()
    worker.join()
    seen["after"] = batch_invariant_on()
    assert seen == {"inside": True, "nested exit": True, "other": False, "after": False}


def test_single_threaded_is_per_thread_and_restores():
    """Two Python threads in single_threaded() blocks at once: each runs on one intra-op thread, and
    closing one block does not change the other's setting; every thread gets its count back."""
    import threading

    from latentflow_fast.probe.invariance import single_threaded

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inside, release, seen = threading.Event(), threading.Event(), {}

        def worker():
            torch.set_num_threads(2)
            with single_threaded():
                inside.set()
                release.wait(10)
                seen["worker inside"] = torch.get_num_threads()
            seen["worker after"] = torch.get_num_threads()

        t = threading.Thread(target=worker)
        t.start()
        inside.wait(10)
        with single_threaded():
            seen["main inside"] = torch.get_num_threads()
        seen["main after"] = torch.get_num_threads()
        release.set()  # the worker's block outlived the main thread's
        t.join(10)
        assert seen == {"main inside": 1, "main after": 2, "worker inside": 1, "worker after": 2}
    finally:
        torch.set_num_threads(before)


def test_engine_handlers_act_only_in_their_thread_and_keep_other_handlers(setup):
    """While the engine runs a batch in this thread, another thread's forward pass of the same model is the
    plain model (it reaches the handler installed before the engine, here a counter), and on exit the
    engine puts back exactly what it replaced."""
    import threading

    from latentflow_fast.models.attention import sdpa

    engine, traj = setup
    model, router = engine.model, engine.model.attention_router
    site = "layers.0.self_attn"
    calls = {"other": 0}

    def counting(s, q, k, v, mask):
        if threading.current_thread().name == "other":
            calls["other"] += 1
        return sdpa(q, k, v, mask)

    args = (traj.states[1], torch.full((1,), traj.schedule[1][1]), traj.inputs.mixture, traj.inputs.text,
            traj.inputs.text_mask)
    with torch.no_grad():
        plain = model(*args)
    router.handlers[site] = counting
    inside, box = threading.Event(), {}
    original = engine._handle

    def handle(*a, **kw):  # the engine's handler, paused once so that the other thread runs meanwhile
        if not inside.is_set():
            inside.set()
            other.join(60)
        return original(*a, **kw)

    def run_other():
        inside.wait(60)
        with torch.no_grad():
            box["out"] = model(*args)

    other = threading.Thread(target=run_other, name="other")
    other.start()
    engine._handle = handle
    try:
        row = engine.run_batch(traj, 1, [Probe(site, "head_ablation", value=0.0, heads=(0,), evaluation=1)])[0]
    finally:
        engine._handle = original
        other.join(60)
    try:
        assert not other.is_alive()
        assert torch.equal(box["out"], plain)  # the other thread ran the model unprobed
        assert calls["other"] >= 1  # through the handler the engine had replaced
        assert row["local_effect"] > 0  # and the engine's own batch was probed
        assert router.handlers == {site: counting}  # put back exactly
    finally:
        router.handlers.clear()
