"""`latentflow probe`: run the causal probing protocol (P0-P6) and write a report.

    latentflow probe                                  # small default model, 24 balanced synthetic scenes -> ./latentflow-report
    latentflow probe --quick --out /tmp/r             # a very small configuration (2 clips cropped to 0.5 s, 4 steps)
    latentflow probe --model tiny --clips 8           # the tiny test model on its own data
    latentflow probe --experiments p3,p6 --clips 4    # a subset (P4/P6 add P3, whose layer split they use)
    latentflow probe --model DIR --audio a.wav b.wav --prompt "sine tone" "chirp" --counterfactual "chirp" "sine tone"

The output folder holds results/<exp>/*.parquet, figures/*.png, summary.json, run_info.json, report.html and
REPORT.md (the Holm-corrected scorecard; `latentflow report FOLDER --markdown PATH` regenerates it).
Rerunning the same command into the same folder resumes (stored rows are skipped) and gives an identical
summary.json. A folder made with other settings (model weights, audio content, prompts, protocol
configuration, backend) is refused, naming what differs; --new keeps such a run in <out>-<settings digest>. Under torchrun the command runs as `python -m latentflow_fast.cli probe ...`.
The clips are split over --workers single-threaded processes (default: one per CPU core), which keeps every
row exact (the rows do not depend on the worker count) while using every core.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from latentflow_fast.numerics import NonFiniteError


def _default(field: str):
    """A ProtocolConfig default, so --help cannot drift from the code."""
    from latentflow_fast.protocol.base import ProtocolConfig

    return getattr(ProtocolConfig(), field)


def _quick(field: str):
    from latentflow_fast.protocol.run import quick_config

    return getattr(quick_config(), field)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "probe", help="run the causal probing protocol and write a report",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="latentflow-report", help="output folder (default: ./latentflow-report)")
    p.add_argument("--model", default=None, help='"small" (default, shipped), "tiny" (shipped, for tests) or a model directory')
    p.add_argument("--audio", nargs="+", default=None, metavar="FILE", help="audio files to probe instead of "
                   "the synthetic clips (one --prompt each)")
    p.add_argument("--prompt", nargs="+", default=None, help="prompt per --audio file (one prompt: used for all)")
    p.add_argument("--counterfactual", nargs="+", default=None,
                   help="counterfactual prompt per --audio file, naming another source in it (P1/P2)")
    p.add_argument("--clips", type=int, default=None,
                   help=f"number of synthetic clips (default {_default('num_clips')}; --quick: {_quick('num_clips')})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"midpoint steps (default {_default('steps')} = {2 * _default('steps')} evaluations; "
                        f"--quick: {_quick('steps')})")
    p.add_argument("--experiments", default=None, help="comma-separated subset of p0,p1,p2,p3,p4,p5,p6")
    p.add_argument("--quick", action="store_true", help="a very small configuration for a smoke run")
    p.add_argument("--seconds", type=float, default=None, help="crop synthetic clips to their first SECONDS")
    p.add_argument("--backend", default=None, help='attention operator backend (default "auto")')
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--workers", type=int, default=None,
                   help="single-threaded processes the clips are split over (default: the number of CPU "
                        "cores; 1 under torchrun or on a GPU); results do not depend on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--new", action="store_true",
                   help="if --out holds results made with other settings, keep this run separately in "
                        "<out>-<settings digest> instead of refusing")
    p.set_defaults(command="probe")
    return p


def build_config(args):
    from latentflow_fast.protocol.base import ProtocolConfig
    from latentflow_fast.protocol.run import experiment_plan, quick_config

    config = quick_config() if args.quick else ProtocolConfig()
    changes = {}
    if args.model is not None:
        changes["model"] = args.model
    if args.clips is not None:
        if args.clips < 1:
            raise SystemExit(f"latentflow probe: --clips must be >= 1, got {args.clips}")
        changes["num_clips"] = args.clips
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit(f"latentflow probe: --steps must be >= 1, got {args.steps}")
        changes["steps"] = args.steps
    if args.experiments is not None:
        names = tuple(n.strip().lower() for n in args.experiments.split(",") if n.strip())
        if not names:
            raise SystemExit("latentflow probe: --experiments is empty; give a comma list of p0,p1,p2,p3,p4,p5,p6")
        try:
            experiment_plan(names)
        except ValueError as exc:
            raise SystemExit(f"latentflow probe: --{exc}") from None
        changes["experiments"] = names
    if args.backend is not None:
        changes["backend"] = args.backend
    if args.seconds is not None and not (args.seconds > 0 and math.isfinite(args.seconds)):
        raise SystemExit(f"latentflow probe: --seconds must be a positive number of seconds, got {args.seconds}")
    return dataclasses.replace(config, **changes)


def _user_clips(args, model):
    from latentflow_fast.protocol.clips import clips_from_files

    prompts = args.prompt or []
    if not prompts:
        raise SystemExit("latentflow probe: --audio needs --prompt (one per file, or one for all)")
    if len(prompts) == 1:
        prompts = prompts * len(args.audio)
    counterfactual = args.counterfactual
    if counterfactual is not None and len(counterfactual) == 1:
        counterfactual = counterfactual * len(args.audio)
    try:
        return clips_from_files(args.audio, prompts, counterfactual, model=model)
    except NonFiniteError:
        raise  # the command's error handler prints it (exit 1)
    except ValueError as exc:
        raise SystemExit(f"latentflow probe: {exc}") from None


def check_args(args) -> None:
    """Arguments, input files and the output folder, before any model is loaded or anything written."""
    from . import checks

    c = "probe"
    checks.at_least(c, "--threads", args.threads, 1)
    checks.at_least(c, "--workers", args.workers, 1)
    if args.audio is None and (args.prompt or args.counterfactual):
        checks.fail(c, "--prompt / --counterfactual need --audio")
    for path in args.audio or ():
        checks.read_audio(c, "--audio", path)
    checks.output_folder(c, "--out", args.out)
    checks.model_spec(c, "--model", args.model)
    checks.backend(c, "--backend", args.backend)


def run(args) -> int:
    import torch

    from latentflow_fast.protocol.report import format_limitations, format_table, headline_rows
    from latentflow_fast.protocol.run import QUICK_CLIP_SECONDS, load_protocol_model, run_protocol

    from latentflow_fast.probe import distributed

    from . import checks

    check_args(args)
    config = build_config(args)
    info = distributed.init_from_env()  # under torchrun: sweeps shard over the ranks (see latentflow_fast.probe.distributed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    seconds = args.seconds if args.seconds is not None else (QUICK_CLIP_SECONDS if args.quick else None)
    started = time.perf_counter()
    model = checks.load_model("probe", "--model", config.model, loader=load_protocol_model)
    clips = _user_clips(args, model) if args.audio else None
    workers = checks.workers("probe", args.workers, next(model.parameters()).device.type,
                             distributed=info is not None)
    out = Path(args.out)
    try:
        summary = run_protocol(config, out, clips=clips, model=model, progress=not args.no_progress,
                               clip_seconds=None if clips else seconds, model_name=str(config.model),
                               new=args.new, workers=workers)
    except NonFiniteError:
        raise  # the command's error handler prints it (exit 1)
    except ValueError as exc:
        raise SystemExit(f"latentflow probe: {exc}") from None
    elapsed = time.perf_counter() - started
    if not distributed.is_main_process():
        return 0
    print()
    print(format_table(headline_rows(summary)))
    card = [c for c in summary.get("scorecard") or [] if c.get("subset") == "all clips"]
    if card:
        print("\nScorecard (all clips; exact Wilcoxon, Holm-adjusted p; see REPORT.md):")
        def detail(c):
            if c.get("p_holm") is None:
                return f"n = {c['n']}; {c.get('reason') or 'no p value'}"
            return f"n = {c['n']}, p_holm = {c['p_holm']:.3g}, effect = {c.get('effect')!s:.6}"

        print(format_table([(c["id"], c["verdict"], detail(c)) for c in card]))
    if summary.get("limitations"):
        print()
        print(format_limitations(summary))
    print(f"\n{len(summary['clips'])} clips, {len(summary['experiments'])} experiments in {elapsed:.0f} s")
    out = Path(summary.get("out_dir", out))
    print(f"report: {(out / 'report.html').resolve()}")
    sys.stdout.flush()
    return 0
