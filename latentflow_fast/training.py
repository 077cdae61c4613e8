"""Deterministic flow-matching training of the tiny default model on synthetic mixtures.

Determinism: every step's data seeds, noise and times are functions of (seed, step) only, so a run
resumed from a checkpoint produces the same weights as an uninterrupted one (same thread count;
``torch.use_deterministic_algorithms(True)``). Flow convention (as the sampler): x_t = (1 - t) x0 + t x1,
x0 ~ N(0, I), x1 = cat(target latent, residual latent), velocity target x1 - x0, MSE loss.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .data import synthetic

CHECKPOINT_NAME = "checkpoint.pt"


@dataclasses.dataclass
class TrainConfig:
    steps: int = 3000
    batch: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    time_sampling: str = "logit_normal"  # or "uniform"
    checkpoint_every: int = 200
    log_every: int = 20

    def validate(self) -> None:
        for name in ("steps", "batch", "threads", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {self.time_sampling!r}")
        if (self.seed + 1) * 1_000_000 > synthetic.TRAIN_SEEDS.stop:
            raise ValueError("seed too large: data seeds would leave the training seed range")
        if self.steps * self.batch > 1_000_000:
            raise ValueError("steps * batch must be <= 1_000_000 (the per-seed slice of the training seed range)")


def setup_determinism(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def data_seeds(cfg: TrainConfig, step: int) -> list[int]:
    """Training data seeds for ``step``: a disjoint slice of TRAIN_SEEDS per (seed, step)."""
    base = cfg.seed * 1_000_000 + step * cfg.batch
    return [base + i for i in range(cfg.batch)]


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def sample_times(cfg: TrainConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    if cfg.time_sampling == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(torch.randn(n, generator=generator))


def make_training_batch(model, cfg: TrainConfig, step: int):
    """(noisy x_t, t, mixture latent, velocity target, prompts) for one step; deterministic in step."""
    batch = synthetic.make_batch(data_seeds(cfg, step))
    codec = model.audio_codec
    with torch.no_grad():
        target = codec.encode(torch.from_numpy(batch.target))
        residual = codec.encode(torch.from_numpy(batch.residual))
        mixture = codec.encode(torch.from_numpy(batch.mixture))
    x1 = torch.cat([target, residual], dim=-1)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    x0 = torch.randn(x1.shape, generator=gen)
    t = sample_times(cfg, x1.shape[0], gen)
    tt = t.view(-1, 1, 1)
    xt = (1.0 - tt) * x0 + tt * x1
    return xt, t, mixture, x1 - x0, list(batch.prompts)


def flow_matching_loss(model, xt, t, mixture, velocity, prompts) -> torch.Tensor:
    memory, memory_mask = model.text_encoder(prompts)
    pred = model(xt, t, mixture, memory, memory_mask)
    return torch.nn.functional.mse_loss(pred, velocity)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(model, cfg: TrainConfig, work_dir: str | Path, log=print) -> dict:
    """Train ``model`` in place; resumes from ``work_dir/checkpoint.pt`` when it exists.

    Returns the training record (losses per step, wall time, ...).
    """
    cfg.validate()
    setup_determinism(cfg.threads)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = work_dir / CHECKPOINT_NAME
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8,
    )
    start_step, losses, wall_before = 0, [], 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        if state["train_config"] != dataclasses.asdict(cfg):
            raise ValueError(f"{ckpt_path} was written with another training config: {state['train_config']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, losses, wall_before = state["step"], state["losses"], state["wall_seconds"]
        log(f"resumed from {ckpt_path} at step {start_step}")
    model.train()
    t_start = time.perf_counter()

    def wall() -> float:
        return wall_before + time.perf_counter() - t_start

    for step in range(start_step, cfg.steps):
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        xt, t, mixture, velocity, prompts = make_training_batch(model, cfg, step)
        loss = flow_matching_loss(model, xt, t, mixture, velocity, prompts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        losses.append(float(loss))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            recent = float(np.mean(losses[-cfg.log_every:]))
            elapsed = wall()
            eta = elapsed / max(1, done - 0) * (cfg.steps - done) if start_step == 0 else (
                (time.perf_counter() - t_start) / (done - start_step) * (cfg.steps - done))
            log(f"step {done}/{cfg.steps} loss {recent:.4f} lr {lr:.2e} grad {float(grad_norm):.2f} "
                f"wall {elapsed:.0f}s eta {eta:.0f}s")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _save_atomic({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                "losses": losses, "wall_seconds": wall(), "train_config": dataclasses.asdict(cfg),
            }, ckpt_path)
    model.eval()
    return {
        "train_config": dataclasses.asdict(cfg),
        "losses": losses,
        "wall_seconds": wall(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "torch_version": torch.__version__,
        "data_seed_range": [data_seeds(cfg, 0)[0], data_seeds(cfg, cfg.steps - 1)[-1]],
    }


def save_model(model, model_config: dict, out_dir: str | Path, record: dict | None = None) -> None:
    """Write ``config.json``, ``model.safetensors`` (and ``training_log.json``) into ``out_dir``."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    if record is not None:
        (out_dir / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")
