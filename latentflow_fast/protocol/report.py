"""Writers for the protocol's outputs: summary.json (every headline figure) and report.html (figures + tables).

summary.json holds only numbers that a rerun reproduces exactly (configuration, model, clips, each
experiment's summary, the figure list); run-dependent facts (wall time, date, versions) go to run_info.json.
report.html links the PNGs relatively (figures/<name>.png), so the folder can be moved as a whole.

Scorecard (protocol v2): every experiment's summary may hold a ``claims`` list, each entry either an
evaluated `stats.paired_claim` dict or a raw ``{id, claim, values, direction, ...}`` (evaluated here).
`scorecard(summary)` collects them in protocol order and applies Holm's correction within each family:
the claims on all clips form one family, those on the separated subset (SI-SDRi >= 3 dB) another.
`scorecard_markdown(summary)` renders REPORT.md (also `latentflow report FOLDER --markdown REPORT.md`);
report.html shows the same table.
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


RECONSTRUCTION_NOTE = (
    "Only the abstract and the first paragraph of the introduction of the paper (Inside the Latent Flow) are "
    "public; every definition, probe and threshold here is our reconstruction of it. A verdict therefore holds "
    "only on this reconstruction, with this model and these clips.")
SUBSETS = ("all clips", "separated")


def scorecard(summary: dict, alpha: float = 0.05) -> list:
    """Every experiment's claims (protocol order), Holm-corrected within each subset family."""
    from .stats import evaluate_claim, holm

    collected = []
    for name, entry in (summary.get("experiments") or {}).items():
        for claim in (entry.get("summary") or {}).get("claims") or []:
            c = evaluate_claim(claim)
            c.setdefault("experiment", name)
            c.setdefault("subset", "all clips")
            collected.append(c)
    out = []
    for subset in sorted({c["subset"] for c in collected}, key=lambda s: (SUBSETS + (s,)).index(s)):
        family = [c for c in collected if c["subset"] == subset]
        for c in holm(family, alpha):
            c["holm_family"] = subset
            out.append(c)
    order = {id(c): i for i, c in enumerate(out)}
    return sorted(out, key=lambda c: (SUBSETS.index(c["subset"]) if c["subset"] in SUBSETS else 9, order[id(c)]))


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def scorecard_rows(claims: list) -> list[dict]:
    """Display rows: id, subset, verdict, effect, interval, n, p, p_holm, mde, test, note, claim."""
    rows = []
    for c in claims:
        note = c.get("reason") or c.get("verdict_note") or ""
        rows.append({
            "id": c.get("id", ""), "subset": c.get("subset", ""), "verdict": c.get("verdict", ""),
            "effect": _num(c.get("effect")) + (f" {c['units']}" if c.get("units") else ""),
            "interval": f"[{_num(c.get('ci_low'))}, {_num(c.get('ci_high'))}]", "n": _num(c.get("n")),
            "p": _num(c.get("p")), "p_holm": _num(c.get("p_holm")), "mde": _num(c.get("mde")),
            "test": c.get("test", ""), "note": note, "claim": c.get("claim", ""),
        })
    return rows


SCORECARD_COLUMNS = ("id", "subset", "verdict", "effect", "interval", "n", "p", "p_holm", "mde", "note")


def scorecard_markdown(summary: dict, title: str = "Protocol report") -> str:
    """REPORT.md text: the reconstruction note, setup, the scorecard (from summary['scorecard'] or recomputed),
    the claims' statements, each experiment's reductions and the limitations."""
    claims = summary.get("scorecard")
    if claims is None:
        claims = json_ready(scorecard(summary))
    model = summary.get("model", {}) or {}
    config = summary.get("config", {}) or {}
    lines = [f"# {title}", "", f"> **Every step is our reconstruction.** {RECONSTRUCTION_NOTE}", "",
             "Generated from `summary.json` by `latentflow report <folder> --markdown REPORT.md`; every number "
             "below is in that file (per-clip values under `scorecard[*].values`).", "", "## Setup", ""]
    lines.append(f"- model: `{model.get('spec', '?')}` ({model.get('parameters', '?')} parameters, "
                 f"{model.get('n_layers', '?')} layers, weights sha256 `{str(model.get('weights_sha256', ''))[:16]}`)")
    lines.append(f"- clips: {len(summary.get('clips', []))}; sampler: {config.get('method', '?')}, "
                 f"{config.get('steps', '?')} steps; noise seed {config.get('noise_seed', '?')}")
    lines.append(f"- experiments: {', '.join(summary.get('experiments', {}))}")
    lines += ["", "## Scorecard", "",
              "Verdicts: **supported** (exact two-sided Wilcoxon signed-rank test of the per-clip effects, "
              "Holm-adjusted p < 0.05, in the abstract's direction), **opposite** (significant, other direction), "
              "**not supported** (no effect in the abstract's direction found), **not testable** (why: power, model "
              "or noise floor). Effect = mean per-clip effect (positive = the abstract's direction), interval = BCa "
              "bootstrap 95% interval of that mean, mde = the smallest mean effect the test detects with 80% power at "
              "this n (stats.py). Holm families: the claims on all clips, and those on the clips the clean model "
              "separates (SI-SDRi >= 3 dB).", ""]
    rows = scorecard_rows(claims)
    if rows:
        lines.append("| " + " | ".join(SCORECARD_COLUMNS) + " |")
        lines.append("|" + "---|" * len(SCORECARD_COLUMNS))
        for r in rows:
            lines.append("| " + " | ".join(str(r[c]).replace("|", "/") for c in SCORECARD_COLUMNS) + " |")
        lines += ["", "### Claims", ""]
        seen = set()
        for r in rows:
            if r["id"] not in seen:
                seen.add(r["id"])
                lines.append(f"- **{r['id']}**: {r['claim']} (test: {r['test']})")
    else:
        lines.append("(no claims in this run)")
    reductions = [(name, (entry.get("summary") or {}).get("grid_reduction"))
                  for name, entry in (summary.get("experiments") or {}).items()]
    reductions = [(n, r) for n, r in reductions if r]
    for name, entry in (summary.get("experiments") or {}).items():  # P4/P6: the grid run vs the full grid
        grid = (entry.get("summary") or {}).get("grid") or {}
        if isinstance(grid, dict) and grid.get("full") and grid.get("run"):
            ran = {k: v for k, v in grid["run"].items() if k in grid["full"]}
            cut = {k: grid["full"][k] for k in ran if ran[k] != grid["full"][k]}
            if cut:
                reductions.append((name, "ran " + "; ".join(f"{k} {ran[k]}" for k in cut) + " of the full grid's "
                                   + "; ".join(f"{k} {v}" for k, v in cut.items()) + " (time budget)"))
    if reductions:
        lines += ["", "## Reductions made to fit the time budget", ""]
        lines += [f"- {name}: {text}" for name, text in reductions]
    p3 = ((summary.get("experiments") or {}).get("p3") or {}).get("summary") or {}
    if p3.get("split"):
        split = p3["split"]
        lines += ["", "## Stable/fast split (P3)", ""]
        for name, crit in (p3.get("criteria") or {}).items():
            lines.append(f"- {name}: stable {crit.get('stable_layers')}, fast {crit.get('fast_layers')}, "
                         f"bootstrap stability {_num(crit.get('bootstrap_stability'))}")
        lines.append(f"- split used: {'no split (' + split.get('reason', '') + ')' if split.get('no_split') else split}")
    limits = summary.get("limitations") or []
    if limits:
        lines += ["", "## Limitations", ""]
        lines += [f"- **{item['topic']}**: {item['text']}" for item in limits]
    return "\n".join(lines) + "\n"


def write_markdown(path, summary: dict) -> Path:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(scorecard_markdown(summary))
    os.replace(tmp, path)
    return path


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
    parts.append(f"<p class='limits'><b>Every step is our reconstruction.</b> {esc(RECONSTRUCTION_NOTE)}</p>")
    card = summary.get("scorecard")
    if card:
        parts.append("<h2 id='scorecard'>Scorecard</h2><p>Exact two-sided Wilcoxon signed-rank tests of per-clip "
                     "effects (positive = the abstract's direction), BCa 95% intervals of the mean, Holm-adjusted "
                     "p within each family (all clips; separated clips); mde = smallest mean effect detectable with "
                     "80% power at this n.</p><table><tr>"
                     + "".join(f"<th>{esc(c)}</th>" for c in SCORECARD_COLUMNS + ("claim",)) + "</tr>")
        for r in scorecard_rows(card):
            parts.append("<tr>" + "".join(f"<td>{esc(str(r[c]))}</td>" for c in SCORECARD_COLUMNS + ("claim",)) + "</tr>")
        parts.append("</table>")
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


__all__ = ["COLLAPSE_ROWS", "RECONSTRUCTION_NOTE", "scorecard", "scorecard_markdown", "scorecard_rows", "write_markdown", "flatten", "format_limitations", "format_table", "headline_rows", "json_ready", "write_json", "write_report"]
