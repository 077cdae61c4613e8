"""Exact sweeps on every CPU core: one single-threaded worker process per core over the engine's sharding.

Exact mode (bitwise batch invariance) needs one intra-op thread per forward pass (see
`invariance.single_threaded`), which leaves the other cores idle. `ProbeEngine(model, workers=N)` instead
starts N worker processes (a persistent pool, started on the first sweep and kept for later ones), each
running torch on one thread. A sweep computes the clean trajectory once in the calling process, sends it
to the workers (once: later sweeps over the same trajectory name it by a token), and every worker runs the probes `shard_of(clip, probe, N)` assigns to it with the
ordinary in-process sweep (`shard=(i, N)`), writing its own result shards (`part-r{i:03d}-...`). The
calling process shows one progress bar and merges the results.

Every row is computed by the same single-threaded code whatever the worker count, batch size, probe
order or sharding, so the merged table is bitwise equal to a one-process run's (tested). With a
`ResultStore` the sweep is resumable like any other: shards are written whole, so killing the process (or
a worker) loses only unfinished batches, and a rerun, with any worker count, skips the stored rows.

A sweep with fewer than MIN_PROBES_PER_WORKER probes per worker left to do runs in-process while the pool
is not started (starting it would cost more than it saves).

Limits: CPU models only (on a GPU exact mode costs nothing, and workers=1 runs in-process); not combined
with torch.distributed ranks (each rank is already one process); `end_metrics` and the engine's
registered runs/vectors are sent to the workers, so `end_metrics` must be picklable (a module-level
function or class instance, not a closure). Workers die with the process that started them (Linux:
parent-death signal; elsewhere they notice on their next message or batch).
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
import weakref
from typing import Optional

import torch

# Below this many probes per worker a sweep runs in-process when the pool is not started yet: starting the
# worker processes (a fresh interpreter importing torch each, 1-6 s) would cost more than it saves.
MIN_PROBES_PER_WORKER = 16
# How often an idle worker checks that its parent is still alive, and how long the parent waits for one
# message before checking that its workers are.
POLL_SECONDS = 0.5


def default_workers() -> int:
    """The number of CPU cores this process may run on (the CLI's default --workers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_workers(workers) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    return workers


def die_with_parent() -> None:
    """Linux: ask the kernel to kill this process when its parent dies (no orphaned workers or torchrun ranks
    writing shards after the sweep that started them was killed)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _worker_main(index: int, world: int, parent: int, state: bytes, tasks, results) -> None:
    """A worker: one torch thread, its own engine on the shared model, sweeps its shard of each task."""
    die_with_parent()
    torch.set_num_threads(1)  # this process is one core's worth of an exact sweep

    from .engine import ProbeEngine
    from .store import ResultStore

    model, options = pickle.loads(state)
    engine = ProbeEngine(model, workers=1, **options)

    def alive() -> bool:
        return os.getppid() == parent

    batches = engine.run_batch
    cache = _TrajectoryCache()
    while True:
        try:
            task = tasks.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if not alive():
                return
            continue
        if task is None:
            return
        try:
            traj, probes, runs, vectors, kwargs, store_path, pause = pickle.loads(task)
            traj = cache.resolve(traj)
            runs = {name: cache.resolve(run) for name, run in runs.items()}
            engine.runs, engine.vectors = runs, vectors

            def run_batch(*args, **kw):
                rows = batches(*args, **kw)
                if not alive():  # the sweep was killed: write nothing more
                    os._exit(1)
                if pause:  # interruption tests slow the sweep down
                    time.sleep(pause)
                results.put(("progress", index, len(rows)))
                return rows

            engine.run_batch = run_batch
            store = None if store_path is None else ResultStore(store_path, rank=index)
            frame = engine.sweep(traj, probes, store=store, progress=False, shard=(index, world), **kwargs)
            results.put(("done", index, None if store is not None else frame))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which re-raises it
            text = traceback.format_exc()
            try:
                payload = pickle.dumps(exc)
            except Exception:  # noqa: BLE001 - an unpicklable exception travels as text
                payload = None
            results.put(("error", index, (payload, text)))


# Trajectories (the clean run, patch sources) are the bulk of a task (up to hundreds of MB with prefix
# records): each is sent to the workers once and named by a token afterwards, as long as it is among the
# last CACHED_TRAJECTORIES sent. Both sides evict in the same order, so they always agree on what is held.
CACHED_TRAJECTORIES = 4


class _TrajectoryCache:
    """The worker side: token -> trajectory, the last CACHED_TRAJECTORIES received."""

    def __init__(self):
        self.held: dict = {}

    def resolve(self, entry):
        kind, token, value = entry
        if kind == "new" and token == 0:  # sent uncached (a task with more trajectories than the cache)
            return value
        if kind == "new":
            self.held[token] = value
            while len(self.held) > CACHED_TRAJECTORIES:
                self.held.pop(next(iter(self.held)))
            return value
        return self.held[token]


class _SentTrajectories:
    """The caller's side: which trajectory objects the workers hold (by identity, checked by weak reference)."""

    def __init__(self):
        self.sent: dict = {}  # token -> weakref to the trajectory
        self.counter = 0

    def encode(self, traj, sending: list):
        """("ref", token, None) if the workers hold `traj`, else ("new", token, traj) (recorded as held once
        the task is sent: `sending` collects the tokens to commit)."""
        for token, ref in self.sent.items():
            if ref() is traj:
                return ("ref", token, None)
        for token, obj in sending:
            if obj is traj:
                return ("ref", token, None)
        self.counter += 1
        sending.append((self.counter, traj))
        return ("new", self.counter, traj)

    def commit(self, sending: list) -> None:
        for token, traj in sending:
            self.sent[token] = weakref.ref(traj)
            while len(self.sent) > CACHED_TRAJECTORIES:
                self.sent.pop(next(iter(self.sent)))


class WorkerPool:
    """N worker processes holding a copy of one engine's model (see the module docstring)."""

    def __init__(self, engine, workers: int):
        import torch.multiprocessing as mp

        self.workers = check_workers(workers)
        ctx = mp.get_context("spawn")  # fork would copy torch's thread pools and locks mid-use
        state = pickle.dumps((engine.model, dict(backend=engine.backend, time_bins=engine.time_bins,
                                                 exact=engine.exact, prefix_reuse=engine.prefix_reuse,
                                                 prefix_cache_bytes=engine.prefix_cache_bytes)))
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(self.workers)]
        self.processes = []
        for i in range(self.workers):
            p = ctx.Process(target=_worker_main, args=(i, self.workers, os.getpid(), state, self.tasks[i],
                                                       self.results),
                            daemon=True, name=f"latentflow-worker-{i}")
            p.start()
            self.processes.append(p)
        self._owner = threading.get_ident()
        self.trajectories = _SentTrajectories()

    def alive(self) -> bool:
        return bool(self.processes) and all(p.is_alive() for p in self.processes)

    def close(self) -> None:
        """Stop the workers (those in the middle of a batch are killed: stored shards stay whole)."""
        for q, p in zip(self.tasks, self.processes):
            if p.is_alive():
                try:
                    q.put(None)
                except (OSError, ValueError):
                    pass
        for p in self.processes:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join()
        self.processes = []

    def run(self, payloads: list, on_progress) -> list:
        """Send one task to every worker; call on_progress(rows) as batches finish; return each worker's
        result. A worker error stops the pool and is re-raised here."""
        for q, payload in zip(self.tasks, payloads):
            q.put(payload)
        outputs: dict = {}
        try:
            while len(outputs) < self.workers:
                try:
                    kind, index, value = self.results.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    dead = [p.name for p in self.processes if not p.is_alive()]
                    if dead:
                        raise RuntimeError(f"sweep worker(s) {', '.join(dead)} died (killed, or out of memory); "
                                           "rerun with a store to resume") from None
                    continue
                if kind == "progress":
                    on_progress(value)
                elif kind == "done":
                    outputs[index] = value
                else:
                    payload, text = value
                    exc = pickle.loads(payload) if payload is not None else None
                    if isinstance(exc, BaseException):
                        raise exc
                    raise RuntimeError(f"sweep worker {index} failed:\n{text}")
        except BaseException:
            self.close()  # a half-finished task must not keep writing behind the caller's back
            raise
        return [outputs[i] for i in range(self.workers)]


def pool_for(engine) -> WorkerPool:
    """The engine's pool (started on first use, restarted if a worker died)."""
    pool = getattr(engine, "_pool", None)
    if pool is not None and (pool.workers != engine.workers or not pool.alive()):
        pool.close()
        pool = None
    if pool is None:
        pool = WorkerPool(engine, engine.workers)
        engine._pool = pool
        weakref.finalize(engine, pool.close)
    return pool


def pooled_sweep(engine, traj, probes, *, end_effect: bool, store, batch_size: Optional[int],
                 memory_budget: Optional[int], progress: bool, end_metrics):
    """ProbeEngine.sweep over the engine's worker pool (same arguments and result as the in-process sweep)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from .batching import available_memory
    from .engine import shard_of

    unique = list({p.probe_id: p for p in probes}.values())
    for p in unique:
        engine._check_probe(p, traj)
    if end_metrics is not None:
        try:
            pickle.dumps(end_metrics)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"end_metrics: workers > 1 sends it to the worker processes, which needs a picklable "
                             f"function (module-level, or an instance of a module-level class), not {end_metrics!r} "
                             f"({exc}); or use workers=1") from None
    clip_id = traj.clip.clip_id
    done = store.done_keys() if store is not None else set()
    todo = [p for p in unique if (clip_id, p.probe_id) not in done]
    world = engine.workers
    pool = getattr(engine, "_pool", None)
    if len(todo) < MIN_PROBES_PER_WORKER * world and (pool is None or not pool.alive()):
        # shard=(0, 1): the ordinary in-process sweep (the same rows)
        return engine.sweep(traj, probes, end_effect=end_effect, store=store, batch_size=batch_size,
                            memory_budget=memory_budget, progress=progress, end_metrics=end_metrics, shard=(0, 1))
    if memory_budget is None:  # the in-process default, shared among the workers
        memory_budget = max(1, available_memory(traj.states[0].device) // 4 // world)
    kwargs = dict(end_effect=end_effect, batch_size=batch_size, memory_budget=memory_budget, end_metrics=end_metrics)
    sources = {p.source for p in todo if p.source}
    runs = {name: run for name, run in engine.runs.items() if name in sources}
    vectors = {name: v for name, v in engine.vectors.items() if name in sources}
    pause = float(getattr(engine, "batch_pause", 0.0))
    store_path = None if store is None else str(store.path)
    pool = pool_for(engine)
    sending: list = []
    sent_traj = pool.trajectories.encode(traj, sending)
    sent_runs = {name: pool.trajectories.encode(run, sending) for name, run in runs.items()}
    # the cache holds at most CACHED_TRAJECTORIES: a task naming more than that sends everything anew
    if len({id(t) for t in [traj, *runs.values()]}) > CACHED_TRAJECTORIES:
        sending = []
        sent_traj = ("new", 0, traj)
        sent_runs = {name: ("new", 0, run) for name, run in runs.items()}
    payloads = []
    for i in range(world):  # every worker gets only its share (shard_of is a stable hash of the ids)
        share = [p for p in todo if shard_of(clip_id, p.probe_id, world) == i]
        payloads.append(pickle.dumps((sent_traj, share, sent_runs, vectors, kwargs, store_path, pause)))
    bar = tqdm(total=len(unique), initial=len(unique) - len(todo), unit="probe", disable=not progress,
               desc=f"probes {clip_id} ({world} workers)", dynamic_ncols=True)
    try:
        frames = pool.run(payloads, bar.update)
        pool.trajectories.commit(sending)  # every worker received them (a failed run closes the pool)
    finally:
        bar.close()
    if store is not None:
        stored = store.load()
        if stored.empty:
            return stored
        ids = {p.probe_id for p in unique}
        return stored[(stored["clip_id"] == clip_id) & stored["probe_id"].isin(ids)].reset_index(drop=True)
    # without a store: the rows in the order the in-process sweep produces them (by group, then input order)
    order = {p.probe_id: (engine_group(engine, p), i) for i, p in enumerate(todo)}
    frame = pd.concat([f for f in frames if f is not None and len(f)], ignore_index=True) if any(
        f is not None and len(f) for f in frames) else pd.DataFrame()
    if frame.empty:
        return frame
    keys = frame["probe_id"].map(order)
    return frame.iloc[sorted(range(len(frame)), key=lambda r: keys.iloc[r])].reset_index(drop=True)


def engine_group(engine, probe):
    """The batch group of a probe in ProbeEngine.sweep: (branch evaluation, first layer acted at)."""
    return (probe.evaluation, engine.first_layer([probe]))
