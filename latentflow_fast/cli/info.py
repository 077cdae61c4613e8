"""`latentflow info`: what a model accepts and what this install can run.

    latentflow info                 # the shipped "tiny" model
    latentflow info --model small   # the shipped 8-layer "small" model
    latentflow info --model DIR     # any model folder load_model reads; --json for a machine-readable dump

Everything is read from the model that --model names (nothing is hard-coded per model): prompt
vocabulary and words per prompt (fixed-vocabulary text encoders), parameter count, codec sample rate,
latent frame rate, the longest input the position range allows, and the clip length it was trained on
(config.json "trained_clip_seconds", else the longest crop of training_log.json's curriculum).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("info", help="show a model's prompt vocabulary, sizes and input limits",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help='"tiny" (default), "small" (shipped) or a model folder')
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def model_folder(spec) -> Optional[Path]:
    """The folder a model spec loads from: itself, or a shipped model's assets folder for a bare name."""
    path = Path(str(spec))
    if path.is_dir():
        return path
    from ..models import loading

    shipped = Path(loading.__file__).resolve().parent.parent / "assets" / str(spec)
    return shipped if shipped.is_dir() else None


def trained_clip_seconds(folder: Optional[Path]) -> Optional[float]:
    if folder is None:
        return None
    config = folder / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("trained_clip_seconds")
        except (ValueError, AttributeError):
            value = None
        if value is not None:
            return float(value)
    log = folder / "training_log.json"
    if log.is_file():
        try:
            train = json.loads(log.read_text()).get("train_config", {})
        except (ValueError, AttributeError):
            return None
        if train.get("clip_seconds") is not None:
            return float(train["clip_seconds"])
        phases = train.get("phases") or []  # (end fraction, crop seconds, batch) of the crop curriculum
        if phases:
            return float(max(p[1] for p in phases))
    return None


def describe(model, spec) -> dict:
    from ..ops.backends import available_backends

    cfg = model.config
    codec, text = model.audio_codec, model.text_encoder
    info = {
        "model": str(spec),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads, "latent_channels": cfg.latent_dim,
        "backends_available": available_backends("cpu"),
    }
    if codec is not None:
        rate = getattr(codec, "frame_rate", None) or codec.sample_rate / codec.hop_length
        info.update(sample_rate=int(codec.sample_rate), latent_frames_per_second=float(rate),
                    max_input_seconds=float(cfg.max_positions / rate))
    info["trained_clip_seconds"] = trained_clip_seconds(model_folder(spec))
    if codec is not None:
        seconds = info["trained_clip_seconds"] or 4.0
        frames = codec.num_frames(int(round(seconds * codec.sample_rate)))
        tokens = max(1, getattr(text, "max_tokens", 1) // 2)
        info["flops_per_evaluation"] = {"clip_seconds": seconds, "frames": frames, "text_tokens": tokens,
                                        "gflops": cfg.flops_per_evaluation(frames, tokens) / 1e9}
    vocabulary = getattr(text, "vocabulary", None)
    info["prompt_vocabulary"] = list(vocabulary) if vocabulary is not None else None
    info["max_prompt_words"] = getattr(text, "max_tokens", None)
    if text is not None and vocabulary is None:
        info["text_encoder"] = type(text).__name__
    return info


def run(args) -> int:
    from . import checks

    model = checks.load_model("info", "--model", args.model)
    info = describe(model, args.model)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"model {info['model']}: {info['parameters']:,} parameters ({info['layers']} layers, {info['heads']} heads, "
          f"dim {info['dim']})")
    if "sample_rate" in info:
        print(f"audio: {info['sample_rate']} Hz in (other rates are resampled), {info['latent_frames_per_second']:g} "
              f"latent frames per second")
        print(f"longest input: {info['max_input_seconds']:g} s (the position range of the model)")
    if "flops_per_evaluation" in info:
        f = info["flops_per_evaluation"]
        print(f"one network evaluation of a {f['clip_seconds']:g} s clip ({f['frames']} frames, {f['text_tokens']} text "
              f"tokens): {f['gflops']:.2f} GFLOP (matrix products and attention)")
    trained = info["trained_clip_seconds"]
    print(f"trained on clips of: {'unknown' if trained is None else f'up to {trained:g} s'}"
          + ("" if trained is None else "; quality falls on much longer inputs"))
    if info["prompt_vocabulary"] is not None:
        print(f"prompt words ({info['max_prompt_words']} at most per prompt): {', '.join(info['prompt_vocabulary'])}")
    elif info.get("text_encoder"):
        print(f"prompts: free text ({info['text_encoder']})")
    else:
        print("prompts: no text encoder attached")
    print(f"attention backends here: {', '.join(info['backends_available'])}")
    return 0
