"""Writers for the protocol's outputs: summary.json (every headline figure) and report.html (figures + tables).

summary.json holds only numbers that a rerun reproduces exactly (configuration, model, clips, each
experiment's summary, the figure list); run-dependent facts (wall time, date, versions) go to run_info.json.
report.html links the PNGs relatively (figures/<name>.png), so the folder can be moved as a whole.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np


def json_ready(value):
    """JSON-serialisable copy: NaN/inf -> None, numpy scalars/arrays -> Python, tuples -> lists, keys -> str."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return json_ready(value.item())
    if isinstance(value, (str, int)) or value is None:
        return value
    return str(value)


def write_json(path, data) -> Path:
    """Atomic write of sorted, indented JSON (bitwise identical for identical data)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_ready(data), indent=1, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if isinstance(value, list):
        text = ", ".join(_fmt(v) for v in value[:12])
        return f"[{text}{', ...' if len(value) > 12 else ''}]"
    return str(value)


def flatten(summary: dict, prefix: str = "", depth: int = 2) -> list[tuple[str, str]]:
    """(dotted key, formatted value) of the scalar and short-list entries of a nested dict."""
    rows = []
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if depth > 0:
                rows += flatten(value, name + ".", depth - 1)
        elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            continue
        else:
            rows.append((name, _fmt(value)))
    return rows


def headline_rows(summary: dict, per_experiment: int = 6) -> list[tuple[str, str, str]]:
    """(experiment, key, value) rows for the CLI table: each experiment's `headline` (if any) and first scalars."""
    rows = []
    for name, entry in summary.get("experiments", {}).items():
        result = entry.get("summary", {}) or {}
        if "headline" in result:
            rows.append((name, "headline", str(result["headline"])))
        scalars = [(k, v) for k, v in flatten(result, depth=0) if k != "headline"]
        rows += [(name, k, v) for k, v in scalars[:per_experiment]]
    return rows


def format_table(rows: Iterable[tuple], width: int = 100) -> str:
    """Aligned rows; long values (headlines) wrap onto indented lines instead of being cut."""
    import textwrap

    rows = list(rows)
    if not rows:
        return "(no results)"
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    room = max(30, width - w0 - w1 - 4)
    lines = []
    for a, b, c in rows:
        wrapped = textwrap.wrap(str(c), room, break_long_words=False, break_on_hyphens=False) or [""]
        lines.append(f"{a:<{w0}}  {b:<{w1}}  {wrapped[0]}")
        lines += [" " * (w0 + w1 + 4) + more for more in wrapped[1:]]
    return "\n".join(lines)


def format_limitations(summary: dict, width: int = 100) -> str:
    import textwrap

    items = summary.get("limitations") or []
    if not items:
        return ""
    lines = ["Limitations of this run:"]
    for item in items:
        lines += textwrap.wrap(f"- [{item['topic']}] {item['text']}", width, subsequent_indent="  ")
    return "\n".join(lines)


COLLAPSE_ROWS = 12  # number tables longer than this start collapsed in report.html


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.2em;font-size:0.85em}td,th{border:1px solid #ccc;padding:2px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}figure{margin:1em 0}img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:0.9em;color:#444;max-width:900px}.headline{background:#f7f7e8;padding:0.4em 0.8em;
border-left:3px solid #bb4}code{background:#f2f2f2;padding:0 3px}.limits{background:#fbf1f1;padding:0.4em 1.2em;
border-left:3px solid #b44}summary{cursor:pointer;color:#225}"""


def write_report(out_dir, summary: dict, figures: list, run_info: dict | None = None) -> Path:
    """report.html: configuration, clips, then per experiment its headline, summary table and figures.

    figures: dicts {"experiment", "path" (relative to out_dir), "caption"}.
    """
    out_dir = Path(out_dir)
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>latentflow probe report</title>"
             f"<style>{_STYLE}</style></head><body>",
             "<h1>Causal probing protocol report</h1>",
             "<p>Deterministic inference-time probing of attention in a flow-matching separation model "
             "(protocol P0-P6 of <i>Inside the Latent Flow</i>, as defined in the project's docs/design.md, section 6). "
             "All numbers below come from <code>summary.json</code>; per-probe rows are in "
             "<code>results/&lt;experiment&gt;/*.parquet</code>.</p>"]
    model = summary.get("model", {})
    parts.append("<h2>Setup</h2><table>")
    for key, value in flatten({"model": model, "config": summary.get("config", {})}, depth=1):
        parts.append(f"<tr><th>{esc(key)}</th><td>{esc(value)}</td></tr>")
    if run_info:
        for key, value in flatten({"run": run_info}, depth=1):
            parts.append(f"<tr><th>{esc(key)}</th><td>{esc(value)}</td></tr>")
    parts.append("</table>")
    clips = summary.get("clips", [])
    if clips:
        columns = list(clips[0].keys())
        parts.append("<h3>Clips</h3><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>")
        for clip in clips:
            parts.append("<tr>" + "".join(f"<td>{esc(_fmt(clip.get(c)))}</td>" for c in columns) + "</tr>")
        parts.append("</table>")
    limits = summary.get("limitations") or []
    if limits:
        parts.append("<h2 id='limitations'>Limitations of this run</h2><div class='limits'><ul>")
        parts += [f"<li><b>{esc(item['topic'])}:</b> {esc(item['text'])}</li>" for item in limits]
        parts.append("</ul></div>")
    parts.append("<h2>Summary</h2><table><tr><th>experiment</th><th>headline</th></tr>")
    for name, entry in summary.get("experiments", {}).items():
        result = entry.get("summary") or {}
        headline = result.get("headline") or "; ".join(f"{k} = {v}" for k, v in flatten(result, depth=0)[:4])
        parts.append(f"<tr><td>{esc(entry.get('title', name))}</td><td>{esc(str(headline))}</td></tr>")
    parts.append("</table>")
    for name, entry in summary.get("experiments", {}).items():
        result = entry.get("summary") or {}
        parts.append(f"<h2 id='{esc(name)}'>{esc(entry.get('title', name))}</h2>")
        if entry.get("description"):
            parts.append(f"<p>{esc(entry['description'])}</p>")
        if "headline" in result:
            parts.append(f"<p class='headline'>{esc(str(result['headline']))}</p>")
        for fig in [f for f in figures if f["experiment"] == name]:
            parts.append(f"<figure><img src='{esc(fig['path'])}' alt='{esc(Path(fig['path']).stem)}'>"
                         f"<figcaption>{esc(fig['caption'])}</figcaption></figure>")
        rows = [r for r in flatten(result) if r[0] != "headline"]
        if rows:
            is_open = " open" if len(rows) <= COLLAPSE_ROWS else ""
            parts.append(f"<details{is_open}><summary>numbers ({len(rows)} entries)</summary><table>")
            for key, value in rows[:200]:
                parts.append(f"<tr><th>{esc(key)}</th><td>{esc(value)}</td></tr>")
            parts.append("</table></details>")
    parts.append("</body></html>\n")
    path = out_dir / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, path)
    return path


__all__ = ["COLLAPSE_ROWS", "flatten", "format_limitations", "format_table", "headline_rows", "json_ready", "write_json", "write_report"]
