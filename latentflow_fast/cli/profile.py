"""`latentflow profile`: run a latentflow command under Nsight Systems, or the torch profiler without nsys.

    latentflow profile -- latentflow sweep --evaluations 0,16
    latentflow profile --tool torch --out prof -- sweep --evaluations 0

With nsys on PATH (and --tool auto or nsys) the command runs as
`nsys profile -t cuda,nvtx,osrt --force-overwrite true -o <out>/latentflow_profile python -m latentflow_fast.cli ...`
and the report is <out>/latentflow_profile.nsys-rep. Otherwise the command runs in this process under
torch.profiler (CPU, and CUDA when available) and a Chrome trace (open it in chrome://tracing or
Perfetto) is written to <out>/latentflow_trace.json. The NVTX ranges are the same in both:
latentflow.evaluation.<k>, latentflow.layer.<i>, latentflow.site.<site>, latentflow.probe_batch.*,
latentflow.probed_attention.<backend>.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile", help="profile a latentflow command (nsys, or the torch profiler)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tool", choices=["auto", "nsys", "torch"], default="auto")
    p.add_argument("--out", default="latentflow-profile", help="output folder")
    p.add_argument("--rows", type=int, default=15, help="rows of the torch profiler summary table")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the latentflow command to profile (after --)")
    return p


def _command(args) -> list:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if command and Path(command[0]).name == "latentflow":
        command = command[1:]
    if not command:
        raise SystemExit("latentflow profile: give the command to profile after --, e.g. "
                         "`latentflow profile -- latentflow sweep --evaluations 0`")
    if command[0] == "profile":
        raise SystemExit("latentflow profile: cannot profile the profile command itself")
    return command


def run(args) -> int:
    from . import checks

    command = _command(args)
    checks.at_least("profile", "--rows", args.rows, 1)
    checks.output_folder("profile", "--out", args.out)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nsys = shutil.which("nsys")
    if args.tool == "nsys" and nsys is None:
        raise SystemExit("latentflow profile: --tool nsys but nsys is not on PATH")
    if nsys is not None and args.tool in ("auto", "nsys"):
        report = out / "latentflow_profile"
        full = [nsys, "profile", "-t", "cuda,nvtx,osrt", "--force-overwrite", "true", "-o", str(report),
                sys.executable, "-m", "latentflow_fast.cli", *command]
        print("running:", " ".join(full))
        status = subprocess.call(full)
        print(f"Nsight Systems report: {report}.nsys-rep  (open with nsys-ui, or `nsys stats {report}.nsys-rep`)")
        return status
    return _torch_profile(command, out, args.rows)


def _torch_profile(command: list, out: Path, rows: int) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from . import main

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=False) as prof:
        status = main(command)
    trace = out / "latentflow_trace.json"
    prof.export_chrome_trace(str(trace))
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=rows)
    (out / "latentflow_profile_summary.txt").write_text(table)
    print(table)
    print(f"torch profiler Chrome trace: {trace}  (chrome://tracing or Perfetto); "
          f"summary: {out / 'latentflow_profile_summary.txt'}")
    return status
