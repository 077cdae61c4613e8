"""The report states what its numbers cannot support (generated from the run), shows full headlines,
integer ticks on counting axes, and collapses long number tables."""

import pytest

from latentflow_fast.protocol.limitations import distinct_bootstrap_resamples, limitations, smallest_wilcoxon_p
from latentflow_fast.protocol.report import COLLAPSE_ROWS, format_limitations, format_table, write_report


def _summary(n_clips=2, kstar=(0, 0, 0), basis="kstar_centered", same=1, ratios=((0.8, 0.12),)):
    lsac = {f"lsac_N{i}": {"measured_wall_saved_fraction": 1 - sum(r) / len(r), "wall_ratio_by_clip": list(r)}
            for i, r in enumerate(ratios)}
    return {
        "clips": [{"clip_id": f"c{i}"} for i in range(n_clips)],
        "experiments": {
            "p3": {"summary": {"kstar_median_by_layer": {str(l): k for l, k in enumerate(kstar)}, "tau": 0.95,
                               "split_basis": basis, "stable_layers": [1, 2], "fast_layers": [0],
                               "clips": n_clips, "clips_with_same_split": same}},
            "p4": {"summary": {"split_source": "p3", "stable_layers": [1, 2], "fast_layers": [0]}},
            "p6": {"summary": {"split_source": "p3", "stable_layers": [1, 2], "fast_layers": [0], "lsac": lsac}},
        },
    }


def test_exact_small_sample_facts():
    assert smallest_wilcoxon_p(2) == 0.5 and smallest_wilcoxon_p(5) == 0.0625 and smallest_wilcoxon_p(6) < 0.05
    assert distinct_bootstrap_resamples(2) == 3 and distinct_bootstrap_resamples(3) == 10


def test_two_clips_with_flat_kstar_and_noisy_timing():
    text = " ".join(item["text"] for item in limitations(_summary()))
    assert "n = 2 clips" in text and "cannot give p below 0.5" in text and "descriptive only" in text
    assert "only 3 distinct resamples" in text and "not a calibrated 95% confidence interval" in text
    assert "k* is 0 for every layer" in text and "fallback rule on the centred" in text
    assert "1 of 2 clips" in text and "P4 and P6 use this split" in text
    assert "Timing noise" in text and "lsac_N0" in text


def test_many_clips_with_consistent_timing_are_not_flagged():
    items = limitations(_summary(n_clips=12, kstar=(3, 5, 9), basis="kstar", same=12,
                                 ratios=((0.60, 0.62, 0.61, 0.63),)))
    text = " ".join(item["text"] for item in items)
    assert "descriptive only" not in text and "distinct resamples" not in text
    assert "for every layer" not in text and "of 12 clips" not in text
    assert "Timing noise" not in text and "consistent over clips: lsac_N0" in text


def test_fallback_split_without_p3_is_named():
    summary = _summary()
    del summary["experiments"]["p3"]
    summary["experiments"]["p4"]["summary"] = {"split_source": "fallback (attention-output cosine)",
                                               "fallback_convergence_index": [0, 0, 1], "fast_layers": [2]}
    text = " ".join(item["text"] for item in limitations(summary))
    assert "P4: P3 was not part of this run" in text and "fallback (attention-output cosine)" in text


def test_cli_table_keeps_whole_headlines():
    headline = "word " * 80
    table = format_table([("p4", "headline", headline.strip()), ("p4", "clips", "2")], width=80)
    assert " ".join(table.split()).count("word") == 80 and "..." not in table
    assert all(len(line) <= 80 for line in table.splitlines())
    assert format_limitations({"limitations": limitations(_summary())}).startswith("Limitations of this run:")


def test_report_has_limitations_and_collapses_long_tables(tmp_path):
    summary = _summary()
    summary["experiments"]["p3"]["summary"]["many"] = {str(i): float(i) for i in range(COLLAPSE_ROWS + 5)}
    summary["experiments"]["p4"]["title"] = "P4"
    summary["limitations"] = limitations(summary)
    html = write_report(tmp_path, summary, []).read_text()
    assert "Limitations of this run" in html and "cannot give p below 0.5" in html
    assert "<details><summary>numbers (" in html  # p3: long, collapsed
    assert "<details open><summary>numbers (" in html  # p4: short, open


def test_counting_axes_get_integer_ticks(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from latentflow_fast.protocol.p1_pathways import save_figure

    fig, (a, b) = plt.subplots(1, 2)
    a.plot([0, 1, 2], [0.1, 0.5, 0.2])
    a.set_xlabel("layer")
    b.plot([0, 1, 2], [0.1, 0.5, 0.2])
    b.set_xlabel("time (s)")
    save_figure(fig, tmp_path / "f.png")
    assert all(float(t).is_integer() for t in a.get_xticks())
    assert not all(float(t).is_integer() for t in b.get_xticks())
