"""Argument checks shared by the subcommands: run before any computation, each failure one line naming
the argument (raised as SystemExit("latentflow <command>: --arg: ..."), which `cli.main` prints and turns
into exit status 2)."""

from __future__ import annotations

import math
import os
from pathlib import Path

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer


def fail(command: str, message: str):
    raise SystemExit(f"latentflow {command}: {message}")


def at_least(command: str, name: str, value, minimum: int) -> None:
    if value is not None and value < minimum:
        fail(command, f"{name} must be >= {minimum}, got {value}")


def seed(command: str, name: str, value) -> None:
    if value is not None and not (0 <= value <= MAX_SEED):
        fail(command, f"{name} must be between 0 and 2**63 - 1, got {value}")


def positive_seconds(command: str, name: str, value) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        fail(command, f"{name} must be a positive number of seconds, got {value}")


def output_folder(command: str, name: str, path) -> Path:
    """A folder we can create or write into. Nothing is created here (a failed run leaves nothing)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        fail(command, f"{name}: {path} exists and is not a folder")
    probe = path
    while not probe.exists():  # nearest existing ancestor: the folder will be created inside it
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        fail(command, f"{name}: cannot create {path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        fail(command, f"{name}: {probe} is not writable")
    return path


def input_file(command: str, name: str, path) -> Path:
    path = Path(path)
    if not path.exists():
        fail(command, f"{name}: no such file: {path}")
    if path.is_dir():
        fail(command, f"{name}: {path} is a folder, not an audio file")
    if not os.access(path, os.R_OK):
        fail(command, f"{name}: {path} is not readable")
    return path


def read_audio(command: str, name: str, path):
    """(samples [S, channels] float32, sample rate) of a WAV/FLAC/OGG file, or one line saying why not."""
    from .._extras import require

    sf = require("soundfile", "audio", "reading audio files")

    path = input_file(command, name, path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        fail(command, f"{name}: cannot read {path} as audio ({' '.join(str(exc).split())})")
    if data.shape[0] == 0:
        fail(command, f"{name}: {path} holds no samples")
    import numpy as np

    if not np.isfinite(data).all():
        fail(command, f"{name}: {path} holds NaN or Inf samples")
    return data, int(rate)


def model_spec(command: str, name: str, spec) -> None:
    """Cheap checks of a --model value before loading it (loading errors are turned into one line too)."""
    from ..models.loading import SHIPPED_MODELS

    if spec is None or str(spec) in SHIPPED_MODELS:
        return
    path = Path(spec)
    if not path.exists():
        fail(command, f"{name}: {spec} is neither a shipped model ({', '.join(SHIPPED_MODELS)}) "
                      f"nor an existing model folder")
    if not path.is_dir():
        fail(command, f"{name}: {spec} is a file; give the model folder (config.json + weights)")
    if not (path / "config.json").is_file():
        fail(command, f"{name}: no config.json in {spec}")


def load_model(command: str, name: str, spec, loader=None, **kwargs):
    """Load --model, turning a broken folder (bad JSON, missing or truncated weights, mismatched keys)
    into one line naming it."""
    model_spec(command, name, spec)
    if loader is None:
        from ..models import load_model as loader
    try:
        return loader(spec if spec is not None else "tiny", **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        if type(exc).__name__ == "NonFiniteError":
            raise
        fail(command, f"{name}: cannot load {spec}: {' '.join(str(exc).split())[:500]}")
    except Exception as exc:  # noqa: BLE001 - e.g. safetensors' SafetensorError for a truncated file
        if "safetensor" not in type(exc).__name__.lower():
            raise
        fail(command, f"{name}: cannot load {spec}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")


def backend(command: str, name: str, value, device_type: str = "cpu") -> None:
    if value is None or value == "auto":
        return
    from ..ops.backends import unavailable_reason

    reason = unavailable_reason(value, device_type)
    if reason is not None:
        fail(command, f"{name}: {reason}")


def workers(command: str, value, device_type: str, distributed: bool) -> int:
    """--workers: default one per CPU core, on the CPU and outside torchrun (there: 1); explicit values that
    cannot apply are refused."""
    from ..probe.workers import default_workers

    if value is None:
        return default_workers() if device_type == "cpu" and not distributed else 1
    if value > 1 and distributed:
        fail(command, f"--workers {value}: under torchrun every rank is one worker; use --workers 1 or "
                      "launch without torchrun")
    if value > 1 and device_type != "cpu":
        fail(command, f"--workers {value}: worker processes are for CPU runs (the model is on {device_type}); "
                      "use --workers 1")
    return value
