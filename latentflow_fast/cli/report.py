"""`latentflow report`: regenerate a protocol folder's report from its summary.json (no model, no probing).

    latentflow report latentflow-report                       # rewrite report.html (scorecard included)
    latentflow report latentflow-report --markdown REPORT.md  # also write the scorecard as Markdown

The scorecard (each claim's verdict, test, n, Holm-adjusted p and interval) is recomputed from the
experiments' claims in summary.json when the file predates it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="regenerate report.html / REPORT.md from a protocol folder",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a `latentflow probe` output folder (holding summary.json)")
    p.add_argument("--markdown", default=None, metavar="PATH", help="also write the Markdown report to PATH")
    p.add_argument("--no-html", action="store_true", help="do not rewrite report.html")
    p.set_defaults(command="report")
    return p


def run(args) -> int:
    from latentflow_fast.protocol.report import json_ready, scorecard, write_markdown, write_report

    folder = Path(args.folder)
    path = folder / "summary.json"
    if not path.is_file():
        raise SystemExit(f"folder: no summary.json in {folder} (run `latentflow probe --out {folder}` first)")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"folder: {path} is not valid JSON ({exc})") from None
    if "scorecard" not in summary:
        summary["scorecard"] = json_ready(scorecard(summary))
    if not args.no_html:
        run_info = {}
        if (folder / "run_info.json").is_file():
            run_info = json.loads((folder / "run_info.json").read_text())
        out = write_report(folder, summary, summary.get("figures", []), run_info)
        print(f"wrote {out}")
    if args.markdown:
        out = write_markdown(args.markdown, summary)
        print(f"wrote {out}")
    return 0
