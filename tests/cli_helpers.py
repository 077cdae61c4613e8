"""Run the `latentflow` command in a subprocess, as a user would, and a small random model on disk."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def latentflow(*args, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    """`python -m latentflow_fast.cli ARGS` with one thread; returns the completed process (text output)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "latentflow_fast.cli", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def save_small_tiny_model(path: Path, seed: int = 0, nan: bool = False) -> Path:
    """A random small model in the tiny model's on-disk format (fast enough for CLI tests)."""
    from latentflow_fast.models.loading import save_tiny_format
    from latentflow_fast.models.tiny import DEFAULT_TINY_CONFIG, build_tiny_model

    torch.manual_seed(seed)
    cfg = copy.deepcopy(DEFAULT_TINY_CONFIG)
    cfg["model"] = dict(dim=32, n_heads=2, n_layers=3)
    model = build_tiny_model(cfg)
    if nan:  # a corrupted checkpoint: NaN weights in the first layer's attention
        with torch.no_grad():
            dict(model.named_parameters())[next(n for n, _ in model.named_parameters()
                                                if "layers.0" in n and "weight" in n)].fill_(float("nan"))
    return save_tiny_format(model, cfg, path)


def write_wav(path: Path, seconds: float = 0.25, rate: int = 16_000, seed: int = 0, peak: float = 0.5) -> Path:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    wave = 0.5 * np.sin(2 * np.pi * (300 + 200 * seed) * t) + 0.2 * rng.standard_normal(n)
    wave = wave / np.abs(wave).max() * peak
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave.astype(np.float32), rate, subtype="FLOAT" if peak > 1 else "PCM_16")
    return path


def leftovers(folder: Path) -> list:
    """Every file under `folder` (relative names), [] when it does not exist."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.exists() else []
