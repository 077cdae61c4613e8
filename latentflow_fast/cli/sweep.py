"""`latentflow sweep`: a batched attention probe sweep over clean trajectories, stored as Parquet.

    latentflow sweep                                    # tiny model, 1 synthetic clip, standard probes
    latentflow sweep --kinds head_ablation --evaluations 0,8,16 --end-effect --out my-sweep
    torchrun --nproc-per-node 2 -m latentflow_fast.cli sweep --out my-sweep   # sharded over 2 ranks

Rerunning the same command resumes: finished probes are skipped. Results: <out>/results/*.parquet, one row
per (clip, probe); `latentflow_fast.probe.ResultStore(<out>/results).load()` reads them as a DataFrame.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--batch-size", type=int, default=None, help="probes per batch (default: from memory)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--pause-per-batch", type=float, default=0.0, help=argparse.SUPPRESS)  # interruption tests
    return p


def _clips(args, model):
    from ..data.synthetic import EVAL_SEEDS, make_mixture
    from ..probe import Clip

    if args.audio:
        import soundfile as sf

        prompts = args.prompt or []
        if len(prompts) != len(args.audio):
            raise SystemExit(f"--prompt needs one prompt per audio file ({len(args.audio)} files, {len(prompts)} prompts)")
        clips = []
        for path, prompt in zip(args.audio, prompts):
            wave, rate = sf.read(path, dtype="float32", always_2d=True)
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


def run(args) -> int:
    from ..models import load_model
    from ..probe import ProbeEngine, ResultStore, standard_probes
    from ..probe import distributed

    info = distributed.init_from_env()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.device_for_rank()
    model = load_model(args.model, device=device)
    engine = ProbeEngine(model, backend=args.backend)
    if args.pause_per_batch > 0:  # slows the sweep down so tests can kill it midway
        run_batch = engine.run_batch
        engine.run_batch = lambda *a, **k: (run_batch(*a, **k), time.sleep(args.pause_per_batch))[0]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    from ..probe import expand_sites

    sites = expand_sites(args.sites, engine.sites)
    out = Path(args.out)
    started = time.perf_counter()
    total = 0
    for clip in _clips(args, model):
        traj = engine.trajectory(clip, steps=args.steps, method=args.method, seed=args.seed, cache_heads="*")
        evaluations = (range(traj.num_evaluations) if args.evaluations == "all"
                       else [int(e) for e in args.evaluations.split(",")])
        probes = standard_probes(sites, engine.num_heads, traj.inputs.text.shape[1], evaluations, kinds,
                                 per_head=not args.all_heads)
        store = ResultStore(out / "results", fingerprint={"model": args.model, "steps": args.steps,
                                                          "method": args.method, "seed": args.seed,
                                                          "end_effect": args.end_effect, "backend": args.backend})
        table = engine.sweep(traj, probes, end_effect=args.end_effect, store=store, batch_size=args.batch_size,
                             progress=not args.no_progress and distributed.is_main_process())
        total += len(table)
    elapsed = time.perf_counter() - started
    if distributed.is_main_process():
        frame = ResultStore(out / "results").load()
        print(f"{total} probe results ({len(frame)} rows stored) in {elapsed:.1f} s -> {out / 'results'}")
        if len(frame):
            top = frame.sort_values("local_effect", ascending=False).head(8)
            print(top[["clip_id", "site", "intervention", "heads", "segments", "evaluation", "local_effect"]]
                  .to_string(index=False))
    if info is not None:
        torch.distributed.destroy_process_group()
    return 0
