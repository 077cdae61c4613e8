"""Run the whole causal probing protocol (P0-P6) into one output folder.

    from latentflow_fast.protocol.run import run_protocol
    summary = run_protocol(ProtocolConfig(), "latentflow-report")

Output folder:
    protocol.json            what the folder was made with (config, model, clips); a mismatch is refused
    results/<exp>/*.parquet  per-probe / per-run rows (the engine's resumable ResultStore)
    figures/*.png            matplotlib figures
    summary.json             every headline figure (identical on a rerun: no timings in it)
    run_info.json            wall time per experiment, versions, threads (differs between runs)
    report.html              the scorecard, the figures with captions and the summary tables
    REPORT.md                the scorecard (Holm-corrected verdicts with test, n, p, interval) in Markdown

Resumable and deterministic: every experiment skips rows already stored and its summary is recomputed
from the stored rows, so an interrupted run continues where it stopped and a rerun writes the same
summary.json. Experiments run in protocol order (P3 before P4/P6, which use its stable/fast split;
asking for P4 or P6 adds P3). Sweeps go through ProbeEngine.sweep, where sharding can be added.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import platform
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .base import ProtocolConfig, ProtocolContext
from .limitations import limitations
from .report import headline_rows, json_ready, scorecard, write_json, write_markdown, write_report

ORDER = ("p0", "p1", "p2", "p3", "p4", "p5", "p6")
MODULES = {
    "p0": "latentflow_fast.protocol.p0_determinism",
    "p1": "latentflow_fast.protocol.p1_pathways",
    "p2": "latentflow_fast.protocol.p2_grid",
    "p3": "latentflow_fast.protocol.p3_convergence",
    "p4": "latentflow_fast.protocol.p4_freezing",
    "p5": "latentflow_fast.protocol.p5_scaffold",
    "p6": "latentflow_fast.protocol.p6_lsac",
}
DEPENDS = {"p4": ("p3",), "p6": ("p3",)}


def quick_config(**overrides) -> ProtocolConfig:
    """A very small configuration (2 clips, 4 midpoint steps = 8 evaluations) for smoke runs and tests."""
    base = dict(num_clips=2, steps=4, time_bins=4, window=4, freeze_starts=(4,), lsac_refresh=(2, 4),
                naive_midpoint_steps=(2,), naive_euler_steps=(4,), bootstrap=200)
    base.update(overrides)
    return ProtocolConfig(**base)


QUICK_CLIP_SECONDS = 0.5  # --quick crops the synthetic clips to their first 0.5 s


def load_experiment(name: str):
    if name not in MODULES:
        raise ValueError(f"experiments: unknown experiment {name!r}; known: {', '.join(ORDER)}")
    return importlib.import_module(MODULES[name]).EXPERIMENT


def experiment_plan(names: Sequence[str]) -> list[str]:
    """Requested experiments plus their dependencies, in protocol order."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    wanted = set()
    for name in names:
        name = str(name).strip().lower()
        if name not in MODULES:
            raise ValueError(f"experiments: unknown experiment {name!r}; known: {', '.join(ORDER)}")
        wanted.add(name)
        # A dependency is added when its module exists (without P3, P4/P6 use their documented fallback).
        wanted.update(d for d in DEPENDS.get(name, ()) if importlib.util.find_spec(MODULES[d]) is not None)
    return [n for n in ORDER if n in wanted]


def load_protocol_model(spec="tiny"):
    """A shipped model ("tiny", "small"), a stand-in model folder (config.json with codec / text_encoder /
    model sections + model.safetensors) or any folder `latentflow_fast.models.load_model` reads."""
    from ..models import load_model

    return load_model(spec if str(spec) in ("tiny", "small") else Path(spec)).eval()


def describe_model(model, spec) -> dict:
    from ..fingerprint import weights_digest

    cfg = model.config
    return {"spec": str(spec), "dim": cfg.dim, "n_heads": cfg.n_heads, "n_layers": cfg.n_layers,
            "latent_dim": cfg.latent_dim,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "weights_sha256": weights_digest(model)}


def describe_clip(pclip) -> dict:
    from ..fingerprint import audio_digest

    clip = pclip.clip
    return {"clip_id": clip.clip_id, "prompt": clip.prompt, "counterfactual": pclip.counterfactual_prompt,
            "group": pclip.group, "gain_group": pclip.meta.get("gain_group", ""),
            "sources": ", ".join(pclip.classes), "seconds": round(clip.mixture.numel() / clip.sample_rate, 3),
            "sample_rate": int(clip.sample_rate), "audio_sha256": audio_digest(clip.mixture, clip.sample_rate)}


def _has_results(out_dir: Path) -> bool:
    results = out_dir / "results"
    return (out_dir / "summary.json").exists() or (results.is_dir() and any(results.rglob("*.parquet")))


def _check_folder(out_dir: Path, manifest: dict) -> None:
    """protocol.json records what the folder was made with; a folder holding results of another setup is
    refused (SettingsMismatch names the differing fields). A protocol.json next to no results (a run that
    failed before computing anything) is replaced."""
    from ..fingerprint import check_manifest

    check_manifest(out_dir / "protocol.json", json_ready(manifest), has_results=lambda: _has_results(out_dir),
                   write=_is_main_process())


def _is_main_process() -> bool:
    from ..probe import distributed

    return distributed.is_main_process()


def protocol_manifest(config: ProtocolConfig, model, clips, clip_seconds, spec) -> dict:
    """Everything that determines the folder's rows: config, model (with a weights digest), clip contents."""
    from ..fingerprint import backend_fingerprint

    return {"config": config.fingerprint(), "model": describe_model(model, spec),
            "clips": [describe_clip(c) for c in clips], "clip_seconds": clip_seconds,
            "engine": backend_fingerprint(config.backend, next(model.parameters()).device.type)}


def run_protocol(config: Optional[ProtocolConfig] = None, out_dir="latentflow-report", clips=None, model=None,
                 progress: bool = True, clip_seconds: Optional[float] = None, model_name: Optional[str] = None,
                 new: bool = False, workers: int = 1) -> dict:
    """Run config.experiments (plus dependencies) and write the output folder; returns the summary dict.

    A folder holding results made with another setup is refused (fingerprint.SettingsMismatch, a
    ValueError naming the differing fields); with new=True the run goes to `separate_folder(out_dir, ...)`
    instead (summary["out_dir"] says where).

    clips: ProtocolClip list (default: `clips.default_clips(config, model, clip_seconds)`).
    model: a loaded model (default: `load_protocol_model(config.model)`); model_name labels it in the report.
    workers: on a CPU, the clips are split over this many single-threaded processes that compute and store
        every experiment's rows (P4-P6 after P3's split is known), and this process then summarises them:
        the same rows bitwise as workers=1 (everything in this process), on every core.
    """
    from tqdm.auto import tqdm

    from ..fingerprint import SettingsMismatch, separate_folder
    from ..probe import ProbeEngine
    from .clips import default_clips

    config = ProtocolConfig() if config is None else config
    if not isinstance(config, ProtocolConfig):
        raise TypeError(f"config must be a ProtocolConfig, got {type(config).__name__}")
    plan = experiment_plan(config.experiments)
    experiments = [load_experiment(name) for name in plan]  # import errors surface before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = model_name or (config.model if model is None else "given model object")
    if model is None:
        model = load_protocol_model(config.model)
    model = model.eval()
    if clips is None:
        clips = default_clips(config, model, seconds=clip_seconds)
    clips = list(clips)
    if not clips:
        raise ValueError("clips: no clips to probe")
    manifest = protocol_manifest(config, model, clips, clip_seconds, spec)
    model_info, clip_info = manifest["model"], manifest["clips"]
    try:
        _check_folder(out_dir, manifest)
    except SettingsMismatch:
        if not new:
            raise
        out_dir = separate_folder(out_dir, manifest)
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_folder(out_dir, manifest)
    sharded_seconds = {}
    if _clip_sharding(workers, clips, model):
        # Every core busy, bitwise as one process: the clips are split over `workers` single-threaded
        # processes, which compute and store every experiment's rows; this process then only loads them.
        sharded_seconds = _run_clip_sharded(plan, config, model, clips, out_dir, workers, progress)
        workers = 1
    # worker processes (if any) stop at engine.close() below, or when the engine is collected / we exit
    engine = ProbeEngine(model, backend=config.backend, time_bins=config.time_bins, workers=workers)
    ctx = ProtocolContext(config=config, model=model, engine=engine, clips=clips, out_dir=out_dir, progress=progress)
    figure_dir = out_dir / "figures"
    figure_dir.mkdir(exist_ok=True)
    figures, timings = [], {}
    bar = tqdm(experiments, desc="protocol", unit="exp", disable=not progress, dynamic_ncols=True)
    for experiment in bar:
        bar.set_postfix_str(experiment.name)
        started = time.perf_counter()
        df = experiment.run(ctx)
        result = json_ready(experiment.summarize(df, ctx))
        ctx.summaries[experiment.name] = result
        for path, caption in experiment.figures(df, result, figure_dir) or []:
            figures.append({"experiment": experiment.name, "path": Path(path).resolve().relative_to(out_dir.resolve()).as_posix(),
                            "caption": caption})
        timings[experiment.name] = round(time.perf_counter() - started, 2)
    summary = {
        "config": config.fingerprint(),
        "clip_seconds": clip_seconds,
        "model": model_info,
        "clips": clip_info,
        "experiments": {e.name: {"title": e.title, "description": _first_paragraph(e),
                                 "summary": ctx.summaries[e.name]} for e in experiments},
        "figures": figures,
    }
    summary["scorecard"] = json_ready(scorecard(json_ready(summary)))
    summary["limitations"] = limitations(json_ready(summary))
    write_json(out_dir / "summary.json", summary)
    run_info = {"seconds_per_experiment": timings,
                "clip_sharded_seconds": sharded_seconds,  # phase -> wall seconds of the clip-sharded processes
                "total_seconds": round(sum(timings.values()) + sum(sharded_seconds.values()), 2),
                "torch": torch.__version__, "python": platform.python_version(),
                "threads": torch.get_num_threads(), "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    write_json(out_dir / "run_info.json", run_info)
    write_report(out_dir, json_ready(summary), figures, run_info)
    write_markdown(out_dir / "REPORT.md", json_ready(summary))
    engine.close()
    return {**json_ready(summary), "out_dir": str(out_dir)}


# ---------------------------------------------------------------------------------- clip-sharded processes
# Experiments whose rows depend on an earlier experiment's summary (P4/P6 use P3's layer split) run in a
# second phase, after this process has summarised the first phase's rows of every clip. P5 shares P4/P6's
# clean trajectory per clip, so it runs with them.
SECOND_PHASE = ("p4", "p5", "p6")


def _clip_sharding(workers: int, clips: list, model) -> bool:
    from ..probe import distributed

    return (int(workers) > 1 and len(clips) > 1 and distributed.current() is None
            and next(model.parameters()).device.type == "cpu")


def _run_clip_sharded(plan: list, config: ProtocolConfig, model, clips: list, out_dir: Path, workers: int,
                      progress: bool) -> dict:
    """Compute every row of `plan` in min(workers, clips) processes, each owning clips[rank::world]. Rows are
    per clip and computed in exact (single-threaded, batch invariant) mode, so they are bitwise the rows
    one process would store; each process writes its own result shards (rank in the shard name).
    Returns {phase: wall seconds}."""
    import multiprocessing

    from ..probe import ProbeEngine, ResultStore

    world = min(int(workers), len(clips))
    phases = [[n for n in plan if n not in SECOND_PHASE], [n for n in plan if n in SECOND_PHASE]]
    summaries, seconds = {}, {}
    for phase in phases:
        if not phase:
            continue
        started = time.perf_counter()
        needed = sorted({d for n in phase for d in DEPENDS.get(n, ()) if d in plan})
        if needed:  # summaries of earlier phases' experiments, from the rows of every clip
            ctx = ProtocolContext(config=config, model=model, clips=clips, out_dir=out_dir, progress=False,
                                  engine=ProbeEngine(model, backend=config.backend, time_bins=config.time_bins))
            for name in needed:
                experiment = load_experiment(name)
                summaries[name] = json_ready(experiment.summarize(experiment.run(ctx), ctx))
        if progress:
            print(f"[protocol] {','.join(phase)} on {len(clips)} clips in {world} processes "
                  f"(progress shown for process 0's {len(clips[0::world])} clips)", flush=True)
        for name in phase:  # the stores' manifests, written here once (check_manifest) before any shard
            ResultStore(out_dir / "results" / name, rank=0, fingerprint=config.fingerprint())
        spawn = multiprocessing.get_context("spawn")
        errors = [out_dir / f".protocol-process-{rank}.err" for rank in range(world)]
        processes = []
        for rank in range(world):
            errors[rank].unlink(missing_ok=True)
            processes.append(spawn.Process(
                target=_clip_shard_main, name=f"latentflow-protocol-{rank}",
                args=(rank, phase, config, model, clips[rank::world], str(out_dir), summaries,
                      progress and rank == 0, str(errors[rank]), torch.get_num_threads())))
        for process in processes:
            process.start()
        try:
            for process in processes:
                process.join()
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
        failed = [(rank, p.exitcode) for rank, p in enumerate(processes) if p.exitcode != 0]
        if failed:
            rank, code = failed[0]
            detail = errors[rank].read_text() if errors[rank].exists() else f"exit code {code}"
            raise RuntimeError(f"protocol process {rank} of {world} failed (rerunning the command resumes from "
                               f"the stored rows):\n{detail}")
        for path in errors:
            path.unlink(missing_ok=True)
        seconds[",".join(phase)] = round(time.perf_counter() - started, 2)
    return seconds


def _clip_shard_main(rank: int, phase: list, config, model, clips: list, out_dir: str, summaries: dict,
                     progress: bool, error_path: str, threads: int) -> None:
    """One clip-sharded process: run (not summarise) the phase's experiments on its clips. The forward passes
    are single-threaded (exact mode) as in one process; the rest (map statistics, metrics) runs on the
    parent's thread count, so that its reductions, and hence the rows, are bitwise the parent's."""
    import traceback

    from ..probe import ProbeEngine
    from ..probe.workers import die_with_parent

    die_with_parent()  # a killed run leaves no process writing shards behind the rerun
    torch.set_num_threads(threads)
    try:
        # trajectory_threads=1: the other processes hold the other cores (the bits are the same either way)
        engine = ProbeEngine(model.eval(), backend=config.backend, time_bins=config.time_bins, trajectory_threads=1)
        ctx = ProtocolContext(config=config, model=model, engine=engine, clips=clips, out_dir=Path(out_dir),
                              progress=progress, store_rank=rank)
        ctx.summaries.update(summaries)
        for name in phase:
            load_experiment(name).run(ctx)
    except BaseException:
        Path(error_path).write_text(traceback.format_exc())
        raise


def _first_paragraph(experiment) -> str:
    module = importlib.import_module(MODULES[experiment.name])
    doc = (module.__doc__ or "").strip()
    return doc.split("\n\n")[0].replace("\n", " ") if doc else ""


__all__ = ["MODULES", "ORDER", "QUICK_CLIP_SECONDS", "experiment_plan", "headline_rows", "load_protocol_model",
           "quick_config", "run_protocol"]
