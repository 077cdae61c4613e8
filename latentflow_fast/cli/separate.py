"""`latentflow separate`: separate the prompted source from an audio file (or a synthetic demo mixture).

    latentflow separate mix.wav --prompt "sine tone" --out-dir out/
    latentflow separate --demo --out-dir out/          # no file needed: a synthetic mixture

Writes <name>.target.wav and <name>.residual.wav (and, with --demo, the mixture and reference stems).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from latentflow_fast.numerics import NonFiniteError

import numpy as np

DEMO_SEED = 1_000_000_007  # a held-out evaluation seed (latentflow_fast.data.EVAL_SEEDS)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "separate", help="separate the prompted source from an audio file",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", nargs="?", help="WAV/FLAC file (any sample rate; multichannel is averaged)")
    p.add_argument("--prompt", help='text naming the source, e.g. "sine tone" (with --demo: default = the '
                                    "demo's own prompt)")
    p.add_argument("--demo", action="store_true", help="build a synthetic mixture instead of reading a file")
    p.add_argument("--demo-seed", type=int, default=DEMO_SEED, help="seed of the --demo mixture")
    p.add_argument("--model", default="tiny", help='"tiny" (default, shipped) or a local model directory')
    p.add_argument("--steps", type=int, default=16, help="ODE steps (midpoint: 2 network evaluations each)")
    p.add_argument("--method", default="midpoint", choices=["midpoint", "euler"])
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--out-dir", default=".", help="where to write the output files")
    p.add_argument("--format", default=None, choices=["wav", "flac"], help="output format (default: input's, else wav)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(command="separate")
    return p


def _write(path: Path, wave, sample_rate: int) -> Path:
    """16-bit PCM when the samples fit in [-1, 1]; louder audio would be clipped there, so it is written as
    32-bit float WAV (FLAC has no float format: it is scaled to peak 1 instead). Either way, it says so."""
    from .._extras import require

    sf = require("soundfile", "audio", "writing audio files")

    wave = np.asarray(wave, dtype=np.float32)
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    subtype = None
    if peak > 1.0:
        if path.suffix.lower() == ".wav":
            subtype = "FLOAT"
            print(f"note: {path.name} peaks at {peak:.2f} (> 1): written as 32-bit float WAV to avoid clipping")
        else:
            wave = wave / peak
            print(f"note: {path.name} peaks at {peak:.2f} (> 1): scaled by 1/{peak:.2f} to fit {path.suffix[1:].upper()}")
    # write under a temporary name, then rename: an interrupted write never leaves half a file
    tmp = path.with_name(f".{path.name}.partial")
    try:
        sf.write(str(tmp), wave, sample_rate, subtype=subtype, format=path.suffix[1:].upper())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_length(model, spec, seconds: float, name: str) -> None:
    """Refuse input beyond the model's position range; say so when it is longer than its training clips."""
    from . import checks
    from .info import model_folder, trained_clip_seconds

    codec = model.audio_codec
    if codec is None:
        return
    rate = getattr(codec, "frame_rate", None) or codec.sample_rate / codec.hop_length
    limit = model.config.max_positions / rate
    if seconds > limit:
        checks.fail("separate", f"{name}: {seconds:.1f} s is longer than the model's limit of {limit:g} s; "
                                "cut it into shorter pieces")
    trained = trained_clip_seconds(model_folder(spec))
    if trained is not None and seconds > 2 * trained:
        print(f"note: the input is {seconds:.1f} s; the model was trained on clips of at most {trained:g} s and "
              "separates long inputs much worse (cut it into pieces of a few seconds)")


def check_args(args) -> None:
    """Every argument and the output folder, before anything is computed or written."""
    from . import checks

    if args.demo == bool(args.input):
        checks.fail("separate", "give either an input file or --demo (not both)")
    checks.at_least("separate", "--steps", args.steps, 1)
    checks.at_least("separate", "--threads", args.threads, 1)
    checks.seed("separate", "--seed", args.seed)
    checks.seed("separate", "--demo-seed", args.demo_seed)
    if args.prompt is not None and not args.prompt.strip():
        checks.fail("separate", "--prompt is empty")
    if args.input and not args.prompt:
        checks.fail("separate", "--prompt is required with an input file")
    checks.output_folder("separate", "--out-dir", args.out_dir)
    checks.model_spec("separate", "--model", args.model)


def run(args) -> int:
    import torch

    from . import checks

    check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    outputs: list = []  # (path, wave, rate): written only after the separation succeeded

    model = None
    if args.demo:
        from latentflow_fast.data import dataset_for

        model = checks.load_model("separate", "--model", args.model)
        mix = dataset_for(model).make_mixture(args.demo_seed)  # the data the model was trained on
        audio, sample_rate, prompt = mix.mixture, mix.sample_rate, args.prompt or mix.prompt
        stem, ext = f"demo_{args.demo_seed}", args.format or "wav"
        outputs.append((out_dir / f"{stem}.mixture.{ext}", mix.mixture, sample_rate))
        for cls, src in zip(mix.classes, mix.sources):
            outputs.append((out_dir / f"{stem}.reference.{cls.replace(' ', '_')}.{ext}", src, sample_rate))
        print(f"demo mixture (seed {args.demo_seed}): {' + '.join(mix.classes)}; prompt {prompt!r}")
    else:
        path = Path(args.input)
        data, sample_rate = checks.read_audio("separate", "input", path)  # [S, channels]
        audio, prompt = data.mean(axis=1), args.prompt
        stem = path.stem
        ext = args.format or (path.suffix.lstrip(".").lower() if path.suffix.lower() in (".wav", ".flac") else "wav")

    if model is None:
        model = checks.load_model("separate", "--model", args.model)
    _check_length(model, args.model, len(audio) / float(sample_rate), "input" if args.input else "--demo")
    try:
        result = model.separate(torch.from_numpy(np.ascontiguousarray(audio)), int(sample_rate), prompt,
                                steps=args.steps, method=args.method, seed=args.seed)
    except NonFiniteError:
        raise  # the command's error handler prints it (exit 1)
    except ValueError as exc:
        raise SystemExit(f"latentflow separate: {exc}") from None
    outputs.append((out_dir / f"{stem}.target.{ext}", result.target.numpy(), result.sample_rate))
    outputs.append((out_dir / f"{stem}.residual.{ext}", result.residual.numpy(), result.sample_rate))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_write(path, wave, rate) for path, wave, rate in outputs]

    if args.demo:
        from latentflow_fast.metrics import identity_correct, si_sdr_improvement

        sdri = float(si_sdr_improvement(result.target, mix.target, mix.mixture))
        line = {"prompt": prompt, "si_sdri_db": round(sdri, 2)}
        if prompt == mix.prompt:
            line["identity_correct"] = bool(identity_correct(result.target, mix.sources, mix.target_index))
        print(json.dumps(line))
    for path in written:
        print(f"wrote {path}")
    return 0
