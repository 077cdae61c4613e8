#!/usr/bin/env python
"""Train the tiny default model on synthetic mixtures (CPU, deterministic, resumable).

    python scripts/train_tiny.py                       # the shipped recipe (defaults below)
    python scripts/train_tiny.py --steps 50 --out-dir /tmp/tiny --work-dir /tmp/tiny_work   # smoke run

Writes <out-dir>/config.json, model.safetensors and training_log.json. Checkpoints go to <work-dir>;
rerunning the same command after an interruption resumes there and gives the same weights.
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

from latentflow_fast.models.tiny import DEFAULT_TINY_CONFIG, build_tiny_model  # noqa: E402
from training.flow_matching import TIME_SAMPLINGS, TrainConfig, save_model, train  # noqa: E402


def parse_args(argv=None):
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=4,
                   help="batch of full 2 s clips; shorter curriculum crops use proportionally larger batches")
    p.add_argument("--phases", default=None,
                   help='curriculum "end_fraction:crop_seconds:batch,..." (overrides --batch), '
                        'default "0.6:0.5:4B,0.85:1:2B,1:2:B"')
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--seed", type=int, default=d.seed, help="init, data and noise seed")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (fixed for determinism)")
    p.add_argument("--time-sampling", default=d.time_sampling, choices=list(TIME_SAMPLINGS))
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--dim", type=int, default=DEFAULT_TINY_CONFIG["model"]["dim"])
    p.add_argument("--heads", type=int, default=DEFAULT_TINY_CONFIG["model"]["n_heads"])
    p.add_argument("--layers", type=int, default=DEFAULT_TINY_CONFIG["model"]["n_layers"])
    p.add_argument("--hop", type=int, default=DEFAULT_TINY_CONFIG["codec"]["hop"], help="codec hop = latent channels")
    p.add_argument("--out-dir", default=str(REPO / "latentflow_fast" / "assets" / "tiny"))
    p.add_argument("--work-dir", default=str(REPO / "runs" / "train_tiny"))
    p.add_argument("--save-dtype", default="float32", choices=["float32", "float16"],
                   help="storage dtype of model.safetensors (float16 halves the file)")
    p.add_argument("--eval-mixtures", type=int, default=32, help="held-out mixtures scored at the end (0 = skip)")
    return p.parse_args(argv)


def quick_eval(model, count: int) -> dict:
    """Median SI-SDRi and identity accuracy on the first `count` held-out mixtures."""
    from latentflow_fast.data import eval_seeds, make_batch
    from latentflow_fast.metrics import identity_correct, si_sdr_improvement

    batch = make_batch(eval_seeds(count))
    out = model.separate(torch.from_numpy(batch.mixture), 16_000, list(batch.prompts), seed=0)
    sdri = si_sdr_improvement(out.target, batch.target, batch.mixture)
    ident = identity_correct(out.target, [m.sources for m in batch.items], [m.target_index for m in batch.items])
    return {"mixtures": count, "median_si_sdri_db": float(sdri.median()),
            "identity_accuracy": float(ident.float().mean())}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.phases:
        phases = tuple((float(e), float(c), int(b)) for e, c, b in (x.split(":") for x in args.phases.split(",")))
    else:
        phases = ((0.6, 0.5, 4 * args.batch), (0.85, 1.0, 2 * args.batch), (1.0, 2.0, args.batch))
    cfg = TrainConfig(steps=args.steps, phases=phases, lr=args.lr, warmup=args.warmup, seed=args.seed,
                      threads=args.threads, time_sampling=args.time_sampling,
                      checkpoint_every=args.checkpoint_every, log_every=args.log_every)
    model_config = copy.deepcopy(DEFAULT_TINY_CONFIG)
    model_config["codec"]["hop"] = args.hop
    model_config["model"].update(dim=args.dim, n_heads=args.heads, n_layers=args.layers, latent_dim=args.hop)
    torch.manual_seed(args.seed)
    model = build_tiny_model(model_config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny model: {n_params:,} parameters; config {json.dumps(model_config['model'])}; hop {args.hop}",
          flush=True)
    t0 = time.time()
    record = train(model, cfg, args.work_dir, log=lambda s: print(s, flush=True))
    record.update(parameters=n_params, model_config=model_config, finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime()))
    if args.eval_mixtures:
        torch.set_num_threads(args.threads)
        record["quick_eval"] = quick_eval(model, args.eval_mixtures)
        print(f"quick eval: {record['quick_eval']}", flush=True)
    save_model(model, model_config, args.out_dir, record, dtype=getattr(torch, args.save_dtype))
    print(f"wrote {args.out_dir} (training wall {record['wall_seconds']:.0f}s, total {time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
