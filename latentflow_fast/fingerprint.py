"""Content fingerprints: what a stored result depends on, so a rerun never returns another setup's rows.

A result folder (a sweep's `results/manifest.json`, a protocol run's `protocol.json`) records the
fingerprint of everything that determines its rows: a digest of the model weights, of every clip's
samples, the prompts, sampler settings, backend and engine options. Reopening it with anything else is
refused with the differing fields named (`check_manifest`), unless the caller asked for a separate folder
(`--new`), which is then derived from the settings digest so that rerunning the same command resumes there.
A folder whose manifest was written but which holds no results yet (a run that failed before computing
anything) is not a conflict: its manifest is replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch

_WEIGHTS_ATTR = "_latentflow_weights_digest"


def _weights_key(model: torch.nn.Module) -> tuple:
    # Identity of the current weights without reading them: storage, layout and in-place version counter
    # of every tensor. Training steps and load_state_dict bump the versions, so the cached digest is redone.
    return tuple((name, t.data_ptr(), tuple(t.shape), str(t.dtype), str(t.device), t._version)
                 for name, t in model.state_dict(keep_vars=True).items())


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, shapes, dtypes and every tensor's bytes), cached on the model."""
    key = _weights_key(model)
    cached = getattr(model, _WEIGHTS_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        if t.is_meta:
            raise ValueError(f"model: tensor {name} has no data (meta device); load the weights first")
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        t = t.to("cpu").contiguous()
        # view as bytes so any dtype (bfloat16 included) hashes without a lossy conversion
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    try:
        setattr(model, _WEIGHTS_ATTR, (key, digest))
    except AttributeError:  # pragma: no cover - frozen objects: just do not cache
        pass
    return digest


def audio_digest(wave, sample_rate: Optional[int] = None) -> str:
    """sha256 of a waveform's float32 samples (and its rate): equal only for the same audio."""
    t = torch.as_tensor(wave).detach().to("cpu", torch.float32).contiguous().reshape(-1)
    h = hashlib.sha256()
    h.update(f"{int(sample_rate) if sample_rate is not None else ''}|{t.numel()}|".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def backend_fingerprint(backend: str, device_type: str) -> dict:
    """The requested backend and, for "auto", which kernels this install can pick from on that device."""
    from .ops.backends import available_backends

    out = {"backend": str(backend)}
    if backend == "auto":
        out["backends_available"] = available_backends(device_type)
    return out


def digest_of(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(normalise(fingerprint), sort_keys=True).encode()).hexdigest()


def normalise(value):
    """JSON-ready (tuples -> lists, paths and other objects -> str) so a manifest compares equal after reloading."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def differing_fields(found, wanted, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves that differ between two JSON values (e.g. "clips[0].audio_sha256")."""
    if isinstance(found, dict) and isinstance(wanted, dict):
        out = []
        for key in sorted(set(found) | set(wanted)):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in found or key not in wanted:
                out.append(path)
            else:
                out.extend(differing_fields(found[key], wanted[key], path))
        return out
    if isinstance(found, list) and isinstance(wanted, list) and len(found) == len(wanted):
        out = []
        for i, (a, b) in enumerate(zip(found, wanted)):
            out.extend(differing_fields(a, b, f"{prefix}[{i}]"))
        return out
    return [] if found == wanted else [prefix or "(all)"]


def _write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)


class SettingsMismatch(ValueError):
    """A results folder holds rows made with other settings."""

    def __init__(self, folder: Path, fields: list[str]):
        shown = ", ".join(fields[:8]) + (f", ... ({len(fields)} fields)" if len(fields) > 8 else "")
        super().__init__(f"{folder} holds results made with other settings (differs in: {shown}); "
                         "use another folder, delete it, or pass --new to keep this run separately")
        self.folder = folder
        self.fields = fields


def check_manifest(path: Path, fingerprint: dict, has_results: Callable[[], bool], write: bool = True) -> None:
    """Refuse (SettingsMismatch) when `path` records another fingerprint and its folder holds results.

    Without a manifest, or with a stale one next to no results, the manifest is (re)written (when `write`);
    results without a manifest are refused too (their settings are unknown).
    """
    path = Path(path)
    wanted = normalise(fingerprint)
    if not path.exists() and has_results():
        # results without a record of their settings (an older version's folder, or a deleted manifest)
        raise SettingsMismatch(path.parent, [f"(no {path.name}: the stored results' settings are unknown)"])
    if path.exists():
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            found = None
        if found == wanted:
            return
        if has_results():
            fields = differing_fields(found, wanted) if isinstance(found, dict) else ["(unreadable manifest)"]
            raise SettingsMismatch(path.parent, fields)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(path, wanted)


def separate_folder(out: Path, fingerprint: dict) -> Path:
    """The folder `--new` uses next to `out`: named by the settings digest, so the same command resumes there."""
    out = Path(out)
    return out.with_name(f"{out.name}-{digest_of(fingerprint)[:10]}")
