"""Deterministic flow-matching training of the shipped stand-in models on seeded synthetic mixtures.

Determinism: every step's data seeds, noise and times are functions of (seed, step) only, so a run
resumed from a checkpoint produces the same weights as an uninterrupted one (same thread count;
``torch.use_deterministic_algorithms(True)`` while training; both settings are restored afterwards). Flow convention (as the sampler): x_t = (1 - t) x0 + t x1,
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
from safetensors.torch import save_file

from latentflow_fast.data import scenes, synthetic
from latentflow_fast.metrics import identity_correct, si_sdr_improvement

# name -> data module (make_batch, TRAIN_SEEDS, CLIP_SECONDS, SAMPLE_RATE, eval_seeds)
DATASETS = {"tiny_synthetic": synthetic, "scenes": scenes}

CHECKPOINT_NAME = "checkpoint.pt"
HELD_OUT_CHECK_OFFSET = 900_000_000
TIME_SAMPLINGS = ("uniform", "low_t", "logit_normal")


@dataclasses.dataclass
class TrainConfig:
    steps: int = 3000
    # curriculum: (end of phase as a fraction of steps, crop length in seconds, batch size); short random
    # crops early (cheap attention, many examples), full 2 s clips at the end (the length used at inference)
    phases: tuple = ((0.6, 0.5, 32), (0.85, 1.0, 16), (1.0, 2.0, 8))
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    # 1 thread: on a shared, oversubscribed CPU two threads were ~6x slower (barrier waits); fixed for determinism
    threads: int = 1
    # "low_t": t = u^2 (half the mass below 0.25): puts weight on the hard part, predicting the source
    # from the mixture when x_t is still mostly noise; "uniform" under-trained it (one-step estimate at t=0
    # far worse than at t=0.3 after a first run)
    time_sampling: str = "low_t"
    checkpoint_every: int = 100
    log_every: int = 20
    dataset: str = "tiny_synthetic"
    # held-out check every `eval_every` steps (0 = never): separation of `eval_mixtures` held-out mixtures
    # with `eval_steps` midpoint steps; median SI-SDRi and identity accuracy go into the log
    eval_every: int = 0
    eval_mixtures: int = 16
    eval_steps: int = 4

    @property
    def data(self):
        return DATASETS[self.dataset]

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {self.dataset!r}")
        synthetic = self.data
        for name in ("steps", "threads", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {self.time_sampling!r}")
        if (self.seed + 1) * 1_000_000 > synthetic.TRAIN_SEEDS.stop:
            raise ValueError("seed too large: data seeds would leave the training seed range")
        if not self.phases:
            raise ValueError("phases must not be empty")
        ends = [p[0] for p in self.phases]
        if ends != sorted(ends) or ends[-1] != 1.0:
            raise ValueError(f"phases must end at increasing fractions with the last at 1.0, got {ends}")
        for _, seconds, batch in self.phases:
            if not (0 < seconds <= synthetic.CLIP_SECONDS) or int(batch) < 1:
                raise ValueError(f"phases: crop seconds must be in (0, {synthetic.CLIP_SECONDS}] and batch >= 1, "
                                 f"got {seconds}, {batch}")
        if self.steps * self.max_batch > 1_000_000:
            raise ValueError("steps * batch must be <= 1_000_000 (the per-seed slice of the training seed range)")

    @property
    def max_batch(self) -> int:
        return max(int(p[2]) for p in self.phases)

    def phase(self, step: int) -> tuple[float, int]:
        """(crop seconds, batch size) at ``step``."""
        for end, seconds, batch in self.phases:
            if step < end * self.steps:
                return float(seconds), int(batch)
        return float(self.phases[-1][1]), int(self.phases[-1][2])


class deterministic_torch:
    """Within the block: ``threads`` intra-op threads and deterministic algorithms; restored on exit."""

    def __init__(self, threads: int):
        self.threads = threads

    def __enter__(self):
        self._saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                       torch.is_deterministic_algorithms_warn_only_enabled())
        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(True)
        return self

    def __exit__(self, *exc):
        threads, enabled, warn_only = self._saved
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)  # both flags, as found
        return False


def data_seeds(cfg: TrainConfig, step: int) -> list[int]:
    """Training data seeds for ``step``: a disjoint slice of TRAIN_SEEDS per (seed, step)."""
    base = cfg.seed * 1_000_000 + step * cfg.max_batch
    return [base + i for i in range(cfg.phase(step)[1])]


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
    if cfg.time_sampling == "low_t":
        return torch.rand(n, generator=generator).square()
    return torch.sigmoid(torch.randn(n, generator=generator))


def make_training_batch(model, cfg: TrainConfig, step: int):
    """(noisy x_t, t, mixture latent, velocity target, prompts) for one step; deterministic in step."""
    data = cfg.data
    batch = data.make_batch(data_seeds(cfg, step))
    codec = model.audio_codec
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    seconds, size = cfg.phase(step)
    waves = torch.from_numpy(np.stack([batch.target, batch.residual, batch.mixture]))  # [3, B, S]
    crop = int(round(seconds * data.SAMPLE_RATE))
    if crop < waves.shape[-1]:
        hop = codec.hop_length
        starts = torch.randint(0, (waves.shape[-1] - crop) // hop + 1, (size,), generator=gen) * hop
        waves = torch.stack([waves[:, b, s:s + crop] for b, s in enumerate(starts.tolist())], dim=1)
    with torch.no_grad():
        target, residual, mixture = (codec.encode(w) for w in waves)
    x1 = torch.cat([target, residual], dim=-1)
    x0 = torch.randn(x1.shape, generator=gen)
    t = sample_times(cfg, x1.shape[0], gen)
    tt = t.view(-1, 1, 1)
    xt = (1.0 - tt) * x0 + tt * x1
    return xt, t, mixture, x1 - x0, list(batch.prompts)


def flow_matching_loss(model, xt, t, mixture, velocity, prompts, return_snr: bool = False):
    """MSE between predicted and true velocity. With ``return_snr`` also the SNR (dB) of the implied
    one-step target estimate x1_hat = x_t + (1 - t) v_hat, a cheap progress indicator."""
    memory, memory_mask = model.text_encoder(prompts)
    pred = model(xt, t, mixture, memory, memory_mask)
    loss = torch.nn.functional.mse_loss(pred, velocity)
    if not return_snr:
        return loss
    with torch.no_grad():
        C = mixture.shape[-1]
        tt = t.view(-1, 1, 1)
        x1 = xt + (1 - tt) * velocity
        x1_hat = xt + (1 - tt) * pred
        err = (x1_hat - x1)[..., :C].pow(2).sum()
        snr = 10 * torch.log10(x1[..., :C].pow(2).sum() / (err + 1e-12))
    return loss, float(snr)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(model, cfg: TrainConfig, work_dir: str | Path, log=None, stop_at: int | None = None) -> dict:
    """Train ``model`` in place; resumes from ``work_dir/checkpoint.pt`` when it exists.

    ``stop_at``: stop (after writing a checkpoint) once this many steps are done, as an interruption
    would; calling again resumes.

    Returns the training record (losses per step, wall time, ...).
    """
    cfg.validate()
    if log is None:
        def log(message: str) -> None:
            print(message, flush=True)
    with deterministic_torch(cfg.threads):
        return _train(model, cfg, Path(work_dir), log, stop_at)


def held_out_check(model, cfg: TrainConfig) -> dict:
    """Separate the first ``cfg.eval_mixtures`` held-out mixtures with ``cfg.eval_steps`` midpoint steps:
    median SI-SDR improvement (dB) and identity accuracy. Uses no global random state."""

    data = cfg.data
    # held-out seeds far from the start of the range, which the quality benchmark and the protocol use
    batch = data.make_batch(data.eval_seeds(cfg.eval_mixtures, offset=HELD_OUT_CHECK_OFFSET))
    was_training = model.training
    model.eval()
    try:
        out = model.separate(torch.from_numpy(batch.mixture), data.SAMPLE_RATE, list(batch.prompts),
                             steps=cfg.eval_steps, seed=0)
    finally:
        model.train(was_training)
    sdri = si_sdr_improvement(out.target, batch.target, batch.mixture)
    ident = identity_correct(out.target, [m.sources for m in batch.items], [m.target_index for m in batch.items])
    return {"median_si_sdri_db": float(sdri.median()), "identity_accuracy": float(ident.float().mean())}


def _train(model, cfg: TrainConfig, work_dir: Path, log, stop_at):
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = work_dir / CHECKPOINT_NAME
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8,
    )
    start_step, losses, snrs, wall_before, checks = 0, [], [], 0.0, []
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        if state["train_config"] != dataclasses.asdict(cfg):
            raise ValueError(f"{ckpt_path} was written with another training config: {state['train_config']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, losses, wall_before = state["step"], state["losses"], state["wall_seconds"]
        snrs = state["target_snr_db"]
        checks = state.get("held_out", [])
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
        loss, snr = flow_matching_loss(model, xt, t, mixture, velocity, prompts, return_snr=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        snrs.append(snr)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            recent = float(np.mean(losses[-cfg.log_every:]))
            recent_snr = float(np.mean(snrs[-cfg.log_every:]))
            elapsed = wall()
            eta = (time.perf_counter() - t_start) / (done - start_step) * (cfg.steps - done)
            log(f"step {done}/{cfg.steps} loss {recent:.4f} x1-snr {recent_snr:.2f} dB lr {lr:.2e} "
                f"grad {float(grad_norm):.2f} crop {cfg.phase(step)[0]:.1f}s x{cfg.phase(step)[1]} "
                f"wall {elapsed:.0f}s eta {eta:.0f}s")
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            check = {"step": done, **held_out_check(model, cfg)}
            checks.append(check)
            log(f"held-out @ {done}: median SI-SDRi {check['median_si_sdri_db']:.2f} dB, "
                f"identity {check['identity_accuracy']:.2f} ({cfg.eval_mixtures} mixtures, {cfg.eval_steps} steps)")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or done == stop_at:
            _save_atomic({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                "losses": losses, "target_snr_db": snrs, "wall_seconds": wall(), "train_config": dataclasses.asdict(cfg),
                "held_out": checks,
            }, ckpt_path)
        if done == stop_at:
            break
    model.eval()
    return {
        "train_config": dataclasses.asdict(cfg),
        "losses": losses,
        "target_snr_db": snrs,
        "held_out": checks,
        "wall_seconds": wall(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "torch_version": torch.__version__,
        "data_seed_range": [data_seeds(cfg, 0)[0], data_seeds(cfg, cfg.steps - 1)[-1]],
    }


def save_model(model, model_config: dict, out_dir: str | Path, record: dict | None = None,
               dtype: torch.dtype = torch.float32) -> None:
    """Write ``config.json``, ``model.safetensors`` (weights stored as ``dtype``; loading casts them back to
    the model's dtype) and ``training_log.json`` into ``out_dir``."""


    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    if record is not None:
        (out_dir / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")
