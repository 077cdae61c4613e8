"""`latentflow sweep`: a batched attention probe sweep over clean trajectories, stored as Parquet.

    latentflow sweep                                    # tiny model, 1 synthetic clip, standard probes
    latentflow sweep --kinds head_ablation --evaluations 0,8,16 --end-effect --out my-sweep
    latentflow sweep --workers 4                        # 4 single-threaded worker processes
    torchrun --nproc-per-node 2 -m latentflow_fast.cli sweep --out my-sweep   # sharded over 2 ranks

Sweeps are exact (bitwise the same table for any batch size, worker count, order and sharding). Exact mode
runs each forward pass on one thread, so the probes are spread over --workers single-threaded worker
processes (default: one per CPU core; 1 = everything in this process; under torchrun each rank is one
worker). The clean trajectory is computed once, in this process.

Rerunning the same command resumes: finished probes are skipped. A folder holding results made with other
settings (model weights, audio content, prompts, clip length, sampler, backend) is refused, naming what
differs; --new keeps such a run separately in <out>-<settings digest>. Results: <out>/results/*.parquet, one row
per (clip, probe); `latentflow_fast.probe.ResultStore(<out>/results).load()` reads them as a DataFrame.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sweep", help="run a batched probe sweep (resumable, torchrun-aware)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help='"tiny" (default) or a SAM Audio checkpoint directory')
    p.add_argument("--audio", nargs="*", default=None, help="audio files (default: synthetic clips)")
    p.add_argument("--prompt", nargs="*", default=None, help="one prompt per audio file")
    p.add_argument("--clips", type=int, default=1, help="number of synthetic held-out clips (default 1)")
    p.add_argument("--clip-seed-offset", type=int, default=0)
    p.add_argument("--clip-seconds", type=float, default=None, help="crop clips to this length")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--method", default="midpoint", choices=["midpoint", "euler"])
    p.add_argument("--seed", type=int, default=0, help="noise seed of the clean trajectory")
    p.add_argument("--sites", nargs="*", default=["layers.*.self_attn", "layers.*.cross_attn"])
    p.add_argument("--kinds", default="head_ablation,text_knockout,uniform",
                   help="comma list of: head_ablation, mean_ablation, uniform, text_knockout")
    p.add_argument("--all-heads", action="store_true", help="intervene on all heads at once (default: per head)")
    p.add_argument("--evaluations", default="all", help='"all" or a comma list of evaluation indices')
    p.add_argument("--end-effect", action="store_true", help="continue every branch to t=1 and score the audio")
    p.add_argument("--out", default="latentflow-sweep", help="output folder (default ./latentflow-sweep)")
    p.add_argument("--new", action="store_true",
                   help="if --out holds results made with other settings, keep this run separately in "
                        "<out>-<settings digest> instead of refusing")
    p.add_argument("--batch-size", type=int, default=None, help="probes per batch (default: from memory)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of this process")
    p.add_argument("--workers", type=int, default=None,
                   help="single-threaded worker processes for the probes (default: the number of CPU cores; "
                        "1 under torchrun or on a GPU)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--pause-per-batch", type=float, default=0.0, help=argparse.SUPPRESS)  # interruption tests
    return p


def _clips(args, model):
    from ..data.synthetic import EVAL_SEEDS, make_mixture
    from ..probe import Clip

    if args.audio:
        from . import checks

        clips = []
        for path, prompt in zip(args.audio, args.prompt):
            wave, rate = checks.read_audio("sweep", "--audio", path)
            mono = torch.from_numpy(wave.mean(axis=1))
            if args.clip_seconds:
                mono = mono[: int(args.clip_seconds * rate)]
            clips.append(Clip(Path(path).stem, mono, int(rate), prompt))
        return clips
    clips = []
    for i in range(args.clips):
        m = make_mixture(EVAL_SEEDS.start + args.clip_seed_offset + i)
        n = len(m.mixture) if not args.clip_seconds else int(args.clip_seconds * m.sample_rate)
        clips.append(Clip(f"seed{m.seed}", torch.from_numpy(m.mixture[:n].copy()), m.sample_rate, m.prompt,
                          target=torch.from_numpy(m.target[:n].copy())))
    return clips


def sweep_fingerprint(args, model, engine, clips, device) -> dict:
    """Everything that determines a stored row besides the probe itself (whose id hashes its own fields)."""
    from ..fingerprint import audio_digest, backend_fingerprint, weights_digest

    def clip_entry(c):
        entry = {"clip_id": c.clip_id, "audio_sha256": audio_digest(c.mixture, c.sample_rate),
                 "sample_rate": int(c.sample_rate), "samples": int(c.mixture.numel()), "prompt": c.prompt}
        if c.target is not None:  # end-effect SI-SDR is scored against it
            entry["target_sha256"] = audio_digest(c.target, c.sample_rate)
        return entry

    return {"model": str(args.model), "weights_sha256": weights_digest(model),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "steps": args.steps, "method": args.method, "seed": args.seed, "end_effect": bool(args.end_effect),
            **backend_fingerprint(args.backend, device.type if hasattr(device, "type") else str(device)),
            "time_bins": engine.time_bins, "exact": engine.exact, "clip_seconds": args.clip_seconds,
            "clips": [clip_entry(c) for c in clips]}


def check_args(args) -> None:
    """Refuse arguments that would fail later, silently do nothing, or do something else than asked: all
    before any model is loaded or anything is written."""
    from ..probe.probes import STANDARD_KINDS
    from ..sampler import num_evaluations
    from . import checks

    c = "sweep"
    checks.at_least(c, "--clips", args.clips, 1)
    checks.at_least(c, "--steps", args.steps, 1)
    checks.at_least(c, "--threads", args.threads, 1)
    checks.at_least(c, "--workers", args.workers, 1)
    checks.at_least(c, "--batch-size", args.batch_size, 1)
    checks.seed(c, "--seed", args.seed)
    checks.at_least(c, "--clip-seed-offset", args.clip_seed_offset, 0)
    checks.positive_seconds(c, "--clip-seconds", args.clip_seconds)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds:
        checks.fail(c, f"--kinds is empty; give a comma list of: {', '.join(STANDARD_KINDS)}")
    unknown = [k for k in kinds if k not in STANDARD_KINDS]
    if unknown:
        checks.fail(c, f"--kinds: unknown {', '.join(unknown)}; known: {', '.join(STANDARD_KINDS)}")
    if not args.sites or not all(s.strip() for s in args.sites):
        checks.fail(c, "--sites is empty; give site patterns such as 'layers.*.self_attn'")
    if args.evaluations != "all":
        total = num_evaluations(args.steps, args.method)
        try:
            evaluations = [int(e) for e in args.evaluations.split(",") if e.strip()]
        except ValueError:
            checks.fail(c, f"--evaluations must be \"all\" or a comma list of integers, got {args.evaluations!r}")
        if not evaluations:
            checks.fail(c, "--evaluations is empty")
        bad = [e for e in evaluations if not 0 <= e < total]
        if bad:
            checks.fail(c, f"--evaluations {bad} out of range: {args.steps} {args.method} steps have "
                           f"evaluations 0..{total - 1}")
    if args.audio is not None:
        if not args.audio:
            checks.fail(c, "--audio needs at least one file")
        prompts = args.prompt or []
        if len(prompts) != len(args.audio):
            checks.fail(c, f"--prompt needs one prompt per audio file ({len(args.audio)} files, {len(prompts)} prompts)")
        for path in args.audio:
            checks.input_file(c, "--audio", path)
    elif args.prompt:
        checks.fail(c, "--prompt needs --audio (the synthetic clips bring their own prompts)")
    checks.output_folder(c, "--out", args.out)
    checks.model_spec(c, "--model", args.model)
    checks.backend(c, "--backend", args.backend)


def run(args) -> int:
    check_args(args)
    from . import checks
    from ..fingerprint import SettingsMismatch, separate_folder
    from ..probe import ProbeEngine, ResultStore, standard_probes
    from ..probe import distributed
    from ..sampler import num_evaluations

    info = distributed.init_from_env()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.device_for_rank()
    if device.type != "cpu":
        checks.backend("sweep", "--backend", args.backend, device.type)
    model = checks.load_model("sweep", "--model", args.model, device=device)
    workers = checks.workers("sweep", args.workers, device.type, distributed=info is not None)
    engine = ProbeEngine(model, backend=args.backend, workers=workers)
    if args.pause_per_batch > 0:  # slows the sweep down so tests can kill it midway
        engine.batch_pause = args.pause_per_batch  # (in the worker processes)
        run_batch = engine.run_batch
        engine.run_batch = lambda *a, **k: (run_batch(*a, **k), time.sleep(args.pause_per_batch))[0]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    from ..probe import expand_sites

    try:
        sites = expand_sites(args.sites, engine.sites)
    except ValueError as exc:
        checks.fail("sweep", f"--sites: {exc}")
    clips = _clips(args, model)
    ids = [c.clip_id for c in clips]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"latentflow sweep: --audio: two files share a name ({', '.join(sorted({i for i in ids if ids.count(i) > 1}))}); "
                         "rename one (results are keyed by the file name)")
    evaluations = (range(num_evaluations(args.steps, args.method)) if args.evaluations == "all"
                   else [int(e) for e in args.evaluations.split(",") if e.strip()])
    plans = []  # (clip, probes), all checked before anything is computed or written
    for clip in clips:
        try:
            text, _ = model.text_encoder([clip.prompt])
        except (ValueError, TypeError) as exc:
            checks.fail("sweep", f"--prompt: {exc}")
        probes = standard_probes(sites, engine.num_heads, text.shape[1], evaluations, kinds,
                                 per_head=not args.all_heads)
        if not probes:
            checks.fail("sweep", f"--kinds {','.join(kinds)} apply to none of the chosen --sites "
                                 "(uniform: self-attention sites; text_knockout: cross-attention sites)")
        plans.append((clip, probes))
    fingerprint = sweep_fingerprint(args, model, engine, clips, device)
    out = Path(args.out)
    try:
        store = ResultStore(out / "results", fingerprint=fingerprint)
    except SettingsMismatch as exc:
        if not args.new:
            raise SystemExit(f"latentflow sweep: --out: {exc}") from None
        out = separate_folder(out, fingerprint)
        if distributed.is_main_process():
            print(f"{args.out} holds results made with other settings; this run is kept in {out}")
        store = ResultStore(out / "results", fingerprint=fingerprint)
    stored_before = store.done_keys()
    started = time.perf_counter()
    tables = []
    for clip, probes in plans:
        traj = engine.trajectory(clip, steps=args.steps, method=args.method, seed=args.seed, cache_heads="*")
        tables.append(engine.sweep(traj, probes, end_effect=args.end_effect, store=store,
                                   batch_size=args.batch_size,
                                   progress=not args.no_progress and distributed.is_main_process()))
    elapsed = time.perf_counter() - started
    if distributed.is_main_process():
        import pandas as pd

        frame = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
        reused = sum((c, p) in stored_before for c, p in zip(frame.get("clip_id", []), frame.get("probe_id", [])))
        print(f"{len(frame)} probe results ({len(frame) - reused} computed now, {reused} already stored with the "
              f"same settings) in {elapsed:.1f} s -> {out / 'results'}")
        if len(frame):
            top = frame.sort_values("local_effect", ascending=False).head(8)
            print(top[["clip_id", "site", "probe_kind", "heads", "segments", "evaluation", "local_effect"]]
                  .to_string(index=False))
    engine.close()
    if info is not None:
        torch.distributed.destroy_process_group()
    return 0
