"""load_model: the shipped stand-ins ("tiny", "small"), or a local SAM Audio directory, with strict key matching."""

from __future__ import annotations

import glob
import json
import os
import warnings
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from .config import SAMAudioConfig
from .sam_audio import SAMAudio
from .text import T5TextEncoder, TextEncoder

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
TINY_DIR = ASSETS_DIR / "tiny"
SMALL_DIR = ASSETS_DIR / "small"
# shipped stand-in models by name (same architecture as SAM Audio, trained here on synthetic data)
SHIPPED_MODELS = {"tiny": TINY_DIR, "small": SMALL_DIR}

# Checkpoint keys of SAM Audio parts this package does not implement; skipped *explicitly* and listed in
# model.load_report["ignored"]. (SAM Audio loads the text encoder, rankers and span predictor elsewhere.)
IGNORED_PREFIXES = ("vision_encoder.", "text_encoder.", "span_predictor.", "visual_ranker.", "text_ranker.")

MAX_LISTED = 20


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    more = len(names) - MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def check_state_dict(expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor]) -> None:
    """Raise ONE ValueError listing missing keys, unexpected keys and shape mismatches together."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
        raise ValueError("checkpoint does not match the model:\n  " + "\n  ".join(parts))


def load_state_dict_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor],
                           dtype: Optional[torch.dtype] = None, assign: bool = False) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)


def read_checkpoint(directory: Union[str, Path]) -> dict[str, torch.Tensor]:
    """checkpoint.pt (torch.load weights_only=True) or *.safetensors (all shards) from a directory."""
    directory = Path(directory)
    pt = directory / "checkpoint.pt"
    if pt.is_file():
        state = torch.load(pt, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("model", "state_dict"):
            state = next(iter(state.values()))
    else:
        shards = sorted(glob.glob(str(directory / "*.safetensors")))
        if not shards:
            raise FileNotFoundError(f"name_or_path: no checkpoint.pt or *.safetensors in {directory}")
        from safetensors.torch import load_file

        state = {}
        for shard in shards:
            state.update(load_file(shard, device="cpu"))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"name_or_path: {directory} does not hold a flat state dict of tensors")
    return state


def _check_device_dtype(device, dtype) -> torch.device:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {e}") from None


def load_model(name_or_path: Union[str, os.PathLike] = "tiny", device="cpu", dtype: torch.dtype = torch.float32,
               text_encoder: Union[TextEncoder, str, os.PathLike, None] = None) -> SAMAudio:
    """Load a shipped stand-in ("tiny": fast tests; "small": 8 layers, the protocol's default) or a local directory.

    A directory holds config.json (SAM Audio's nested format or SAMAudioConfig.to_dict()) and checkpoint.pt
    or *.safetensors. Keys match strictly; SAM Audio parts not implemented here (IGNORED_PREFIXES) are
    skipped and listed in `model.load_report`. `text_encoder` (a TextEncoder or a local T5 directory) is
    attached after loading, since SAM Audio checkpoints do not hold it. Returns the model in eval mode.
    """
    device = _check_device_dtype(device, dtype)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    if str(name_or_path) in SHIPPED_MODELS:
        model = _load_tiny(SHIPPED_MODELS[str(name_or_path)], name=str(name_or_path))
    elif _is_tiny_format(Path(name_or_path)):
        model = _load_tiny(Path(name_or_path))
    else:
        model = _load_directory(Path(name_or_path), dtype)
    if text_encoder is not None:
        if isinstance(text_encoder, (str, os.PathLike)):
            text_encoder = T5TextEncoder(text_encoder)
        if not isinstance(text_encoder, TextEncoder):
            raise TypeError(f"text_encoder must be a TextEncoder or a path, got {type(text_encoder).__name__}")
        if text_encoder.dim != model.config.text_dim:
            raise ValueError(f"text_encoder: dim {text_encoder.dim} != model text_dim {model.config.text_dim}")
        model.text_encoder = text_encoder
    return model.to(device=device, dtype=dtype).eval()


def _is_tiny_format(directory: Path) -> bool:
    """A directory saved in the tiny default's layout (config.json with codec/text_encoder/model sections)."""
    config_path = directory / "config.json"
    if not (config_path.is_file() and (directory / "model.safetensors").is_file()):
        return False
    with open(config_path) as f:
        config = json.load(f)
    return isinstance(config, dict) and {"codec", "text_encoder", "model"} <= set(config)


def save_tiny_format(model: SAMAudio, config_dict: dict, directory: Union[str, os.PathLike]) -> Path:
    """Save a model built by `build_tiny_model(config_dict)` so that `load_model(directory)` reloads it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "config.json", "w") as f:
        json.dump(config_dict, f, indent=1)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    return directory


def _load_tiny(directory: Path, name: Optional[str] = None) -> SAMAudio:
    """A stand-in model saved in the shipped layout (config.json with codec/text_encoder/model sections)."""
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"name_or_path: the {name or 'stand-in'} model's assets are missing ({config_path}, {weights_path}); "
            f"train it with the repository's training script (scripts/train_{name or 'small'}.py)"
        )
    from safetensors.torch import load_file

    from .standins import build_standin_model

    with open(config_path) as f:
        config = json.load(f)
    model = build_standin_model(config)
    load_state_dict_strict(model, load_file(str(weights_path), device="cpu"), dtype=torch.float32)
    model.standin_config = config
    model.load_report = {"source": name or str(directory), "ignored": {}}
    return model


def _load_directory(directory: Path, dtype: torch.dtype) -> SAMAudio:
    if not directory.is_dir():
        raise FileNotFoundError(f"name_or_path: {directory} is neither 'tiny' nor a directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"name_or_path: no config.json in {directory}")
    with open(config_path) as f:
        raw = json.load(f)
    config = SAMAudioConfig.from_dict(raw)
    state = read_checkpoint(directory)
    ignored: dict[str, int] = {}
    for key in list(state):
        prefix = next((p for p in IGNORED_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            ignored[prefix] = ignored.get(prefix, 0) + 1
            del state[key]
    if ignored:
        warnings.warn(f"load_model: skipped checkpoint keys of parts not implemented here: {ignored}")
    codec = _build_codec(config, state)
    with torch.device("meta"):  # no random init of billions of parameters: weights are assigned below
        model = SAMAudio(config, audio_codec=codec)
    for key, value in state.items():  # cast in place, one tensor at a time: no second full copy
        if value.is_floating_point():
            state[key] = value.to(dtype)
    load_state_dict_strict(model, state, assign=True)
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"tensors left uninitialised after loading: {_listing(meta)}")
    model.load_report = {"source": str(directory), "ignored": ignored}
    return model


def _build_codec(config: SAMAudioConfig, state: Mapping[str, torch.Tensor]):
    """A DAC-VAE when the checkpoint carries audio_codec.* weights; else no codec."""
    if not any(k.startswith("audio_codec.") for k in state):
        return None
    from .codecs import DACVAE

    with torch.device("meta"):
        return DACVAE(**(config.audio_codec or {}))
