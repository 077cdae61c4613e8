#!/usr/bin/env python
"""Train the `small` stand-in model on seeded sound scenes (CPU, deterministic, resumable).

    python scripts/train_small.py                      # the shipped recipe (defaults below)
    python scripts/train_small.py --steps 20 --out-dir /tmp/small --work-dir /tmp/small_work   # smoke run

A second stage continues from the first stage's final weights with its own schedule, data seeds and
work folder (deterministic too: its start is a function of stage 1):

    python scripts/train_small.py --init-from runs/train_small/checkpoint.pt --seed 1 --steps 1000 \
        --phases 1:4:16 --lr 5e-4 --warmup 50 --work-dir runs/train_small_stage2

Writes <out-dir>/config.json, model.safetensors and training_log.json. Checkpoints go to <work-dir>;
rerunning the same command after an interruption (kill, Ctrl-C, end of a session) resumes there and gives
bitwise the same weights as an uninterrupted run (same thread count).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from latentflow_fast.models.small import DEFAULT_SMALL_CONFIG, build_small_model  # noqa: E402
from training.flow_matching import TIME_SAMPLINGS, TrainConfig, save_model, train  # noqa: E402

DEFAULT_STEPS = 1500


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--phases", default="0.5:2:32,1:4:16",
                   help='curriculum "end_fraction:crop_seconds:batch,...": 2 s crops first, full 4 s clips last')
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="init, data and noise seed")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed: resuming needs the same count)")
    p.add_argument("--time-sampling", default="uniform", choices=list(TIME_SAMPLINGS))
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=200, help="held-out check interval in steps (0 = off)")
    p.add_argument("--out-dir", default=str(REPO / "latentflow_fast" / "assets" / "small"))
    p.add_argument("--work-dir", default=str(REPO / "runs" / "train_small"))
    p.add_argument("--init-from", default=None,
                   help="start from the model weights of this training checkpoint (a second training stage)")
    p.add_argument("--save-dtype", default="float16", choices=["float32", "float16"],
                   help="storage dtype of model.safetensors (float16 halves the file)")
    p.add_argument("--previous-log", default=None,
                   help="training_log.json of the stage that --init-from continues: embedded whole (with its own "
                        "earlier stages) so the log and total wall time cover every stage")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    phases = tuple((float(e), float(c), int(b)) for e, c, b in (x.split(":") for x in args.phases.split(",")))
    cfg = TrainConfig(steps=args.steps, phases=phases, lr=args.lr, warmup=args.warmup, seed=args.seed,
                      threads=args.threads, time_sampling=args.time_sampling, dataset="scenes",
                      checkpoint_every=args.checkpoint_every, log_every=args.log_every, eval_every=args.eval_every)
    model_config = copy.deepcopy(DEFAULT_SMALL_CONFIG)
    torch.manual_seed(args.seed)
    model = build_small_model(model_config)
    previous = None
    if args.init_from:
        state = torch.load(args.init_from, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        previous = {"init_from": str(args.init_from), "step": state["step"], "train_config": state["train_config"],
                    "wall_seconds": state["wall_seconds"], "held_out": state.get("held_out", []),
                    "losses": state["losses"]}
        print(f"starting from {args.init_from} (step {state['step']} of its run)", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"small model: {n_params:,} parameters; config {json.dumps(model_config['model'])}", flush=True)
    t0 = time.time()
    record = train(model, cfg, args.work_dir, log=lambda s: print(s, flush=True))
    if previous is not None:
        if args.previous_log:
            # The checkpoint knows only its own stage; the previous stage's log knows the stages before it.
            with open(args.previous_log) as f:
                previous_log = json.load(f)
            if previous_log.get("train_config", {}).get("steps") != previous["step"]:
                raise ValueError(f"--previous-log {args.previous_log} ends at step "
                                 f"{previous_log.get('train_config', {}).get('steps')}, but --init-from "
                                 f"{args.init_from} is at step {previous['step']}")
            previous = dict(previous_log, init_from=str(args.init_from), step=previous["step"])
        record["previous_stage"] = previous
        record["total_wall_seconds"] = previous.get("total_wall_seconds", previous["wall_seconds"]) + record["wall_seconds"]
    record.update(parameters=n_params, model_config=model_config,
                  finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    save_model(model, model_config, args.out_dir, record, dtype=getattr(torch, args.save_dtype))
    print(f"wrote {args.out_dir} (training wall {record['wall_seconds']:.0f}s, total {time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
