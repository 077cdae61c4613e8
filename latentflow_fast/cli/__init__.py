"""The `latentflow` command line: one subcommand per module in this package.

    latentflow separate --demo            separate a synthetic mixture with the embedded tiny model
    latentflow sweep                      batched probe sweep over a clean trajectory (Parquet results)
    latentflow probe                      run the causal probing protocol and write a report
    latentflow profile -- <command...>    run a probing command under Nsight Systems or the torch profiler
    latentflow info                       a model's prompt vocabulary, sizes and input limits
    latentflow report FOLDER              regenerate report.html (and --markdown REPORT.md) from summary.json

Also runnable as `python -m latentflow_fast.cli ...` (which is what torchrun launches).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand name -> module (each exposes add_parser(subparsers) and run(args) -> int | None).
SUBCOMMANDS = {
    "separate": "latentflow_fast.cli.separate",
    "sweep": "latentflow_fast.cli.sweep",
    "probe": "latentflow_fast.cli.probe",
    "profile": "latentflow_fast.cli.profile",
    "info": "latentflow_fast.cli.info",
    "report": "latentflow_fast.cli.report",
}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:  # subcommand not part of this build
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentflow", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    subparsers.required = True
    for module_name in SUBCOMMANDS.values():
        module = _load(module_name)
        if module is not None:
            module.add_parser(subparsers)
    return parser


def _line(name: str, message: str) -> str:
    message = " ".join(str(message).split()) if "\n" not in str(message).strip() else str(message).strip()
    return message if message.startswith("latentflow") else f"latentflow {name}: {message}"


def main(argv=None) -> int:
    """Run one subcommand. Mistakes print one line naming the argument and return 2; a model that
    produces NaN/Inf prints one line and returns 1; Ctrl-C prints one line and returns 130."""
    from ..numerics import NonFiniteError

    parser = build_parser()
    args = parser.parse_args(argv)
    name = args.subcommand
    try:
        status = _load(SUBCOMMANDS[name]).run(args)
    except SystemExit as exc:
        if isinstance(exc.code, str):  # raise SystemExit("message"): a usage error found by the command
            print(_line(name, exc.code), file=sys.stderr)
            return 2
        raise
    except NonFiniteError as exc:
        print(_line(name, f"error: {exc}"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resumable = " (rerun the same command to resume)" if name in ("sweep", "probe") else ""
        print(f"\nlatentflow {name}: interrupted{resumable}", file=sys.stderr)
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
