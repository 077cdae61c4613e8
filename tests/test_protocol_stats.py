"""Hand-checked statistics of the protocol's scorecard (protocol/stats.py): exact Wilcoxon, BCa, MDE, Holm."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from latentflow_fast.protocol.stats import (bca_interval, evaluate_claim, exact_wilcoxon, holm, min_attainable_p,
                                            minimum_detectable_effect, paired_claim)


def brute_force_p(values):
    """Two-sided p of the signed-rank sum by enumerating all 2**n sign patterns (mid-ranks for ties)."""
    d = np.asarray([v for v in values if v != 0], dtype=float)
    ranks = sps.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    centre = ranks.sum() / 2
    hits = 0
    for signs in itertools.product([0, 1], repeat=d.size):
        hits += abs(ranks[np.array(signs, bool)].sum() - centre) >= abs(observed - centre) - 1e-9
    return hits / 2 ** d.size


def test_exact_wilcoxon_hand_values():
    # all six positive: only the two all-equal-sign patterns are as extreme -> 2/64
    assert exact_wilcoxon([1, 2, 3, 4, 5, 6])["p_value"] == pytest.approx(2 / 64)
    # T- = 6: 14 of the 64 subsets of {1..6} sum to <= 6, doubled for two sides -> 28/64
    r = exact_wilcoxon([1, 2, 3, 4, 5, -6])
    assert (r["statistic"], r["r_minus"], r["method"]) == (15.0, 6.0, "scipy-exact")
    assert r["p_value"] == pytest.approx(28 / 64)
    # zeros are dropped (n counts them, n_nonzero does not)
    z = exact_wilcoxon([0, 1, 2, 3, 4, 5, -6])
    assert (z["n"], z["n_nonzero"]) == (7, 6) and z["p_value"] == pytest.approx(28 / 64)
    assert exact_wilcoxon([0, 0, 0])["p_value"] == 1.0
    assert math.isnan(exact_wilcoxon([math.nan])["p_value"])


@pytest.mark.parametrize("values", [[1, 2, 2, 4, 5, -6], [1, 1, 1, -1, 2, 3, 3], [0.5, -0.5, 2, 2, -2, 7, 1, 1]])
def test_exact_wilcoxon_with_ties_matches_enumeration(values):
    r = exact_wilcoxon(values)
    assert r["method"] == "exact-ties"
    assert r["p_value"] == pytest.approx(brute_force_p(values), abs=1e-12)
    # and scipy's exact permutation enumeration of the same statistic
    ref = sps.wilcoxon(values, method=sps.PermutationMethod(n_resamples=10 ** 6))
    assert r["p_value"] == pytest.approx(ref.pvalue, abs=1e-12)


def test_min_p_mde_and_power_floor_verdicts():
    assert min_attainable_p(5) == pytest.approx(2 / 32) and min_attainable_p(6) == pytest.approx(2 / 64)
    # (z_.975 + z_.80) / sqrt(24 * 3/pi) = 2.80158 / 4.78729
    mde, mde_sd = minimum_detectable_effect(24, sd=2.0)
    assert mde_sd == pytest.approx(2.801585 / math.sqrt(24 * 3 / math.pi), rel=1e-5)
    assert mde == pytest.approx(2 * mde_sd)
    five = paired_claim([1, 2, 3, 4, 5], claim_id="x", claim="c")
    assert five["verdict_pre_holm"] == "not testable" and five["reason"].startswith("power")
    zeros = paired_claim([0.0] * 20 + [1.0, 2.0], claim_id="x", claim="c")  # no effect found, not "power"
    assert zeros["verdict_pre_holm"] == "not supported" and zeros["p"] == pytest.approx(0.5)
    tiny = paired_claim(np.linspace(0.001, 0.002, 10), claim_id="x", claim="c", floor=0.01)
    assert tiny["verdict_pre_holm"] == "not testable" and tiny["reason"].startswith("floor")
    assert paired_claim(np.linspace(0.001, 0.002, 10), claim_id="x", claim="c")["verdict_pre_holm"] == "supported"
    model = paired_claim([1.0] * 10, claim_id="x", claim="c", not_testable="model: no text pathway")
    assert model["verdict_pre_holm"] == "not testable" and model["reason"] == "model: no text pathway"


def test_direction_and_opposite():
    neg = -np.arange(1, 9, dtype=float)
    c = paired_claim(neg, claim_id="a", claim="c")
    assert c["verdict_pre_holm"] == "opposite" and c["p"] == pytest.approx(2 / 256) and c["effect"] == -4.5
    flipped = paired_claim(neg, claim_id="a", claim="c", direction=-1)
    assert flipped["verdict_pre_holm"] == "supported" and flipped["effect"] == 4.5
    mixed = paired_claim([1, -1, 2, -2, 3, -3, 4, -4], claim_id="a", claim="c")
    assert mixed["verdict_pre_holm"] == "not supported" and mixed["p"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="direction"):
        paired_claim([1.0], claim_id="a", claim="c", direction=2)
    with pytest.raises(ValueError, match="floor"):
        paired_claim([1.0], claim_id="a", claim="c", floor=-1)


def test_bca_interval_deterministic_and_degenerate():
    v = np.random.default_rng(3).normal(1.0, 1.0, 24)
    lo, hi = bca_interval(v, resamples=999, seed=1)
    assert lo < v.mean() < hi and (lo, hi) == bca_interval(v, resamples=999, seed=1)
    assert bca_interval([2.0, 2.0, 2.0]) == (2.0, 2.0) and bca_interval([3.0]) == (3.0, 3.0)
    assert all(math.isnan(x) for x in bca_interval([]))


def test_holm_hand_values_and_final_verdict():
    def fake(i, p, verdict="supported"):
        return {"id": i, "claim": i, "p": p, "verdict_pre_holm": verdict}

    # sorted p 0.01, 0.03, 0.04 with m = 3: 0.03, max(0.03, 0.06), max(0.06, 0.04) -> 0.03, 0.06, 0.06
    out = holm([fake("a", 0.01), fake("b", 0.04), fake("c", 0.03), fake("d", 0.5, "not testable")])
    assert [c["p_holm"] for c in out[:3]] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(out[3]["p_holm"]) and out[0]["holm_family_size"] == 3
    assert [c["verdict"] for c in out] == ["supported", "not supported", "not supported", "not testable"]
    assert "before the Holm correction" in out[1]["verdict_note"]
    # raw {id, claim, values, direction} entries are evaluated on the way
    raw = holm([{"id": "r", "claim": "c", "values": list(range(1, 11)), "direction": 1}])
    assert raw[0]["verdict"] == "supported" and raw[0]["p_holm"] == pytest.approx(2 / 1024)
    with pytest.raises(ValueError, match="values"):
        evaluate_claim({"id": "x", "claim": "c"})


def test_scorecard_holm_families_markdown_and_cli(tmp_path):
    import json

    from latentflow_fast.cli import main
    from latentflow_fast.protocol.report import scorecard, scorecard_markdown

    up = list(range(1, 11))  # p = 2/1024 each
    summary = {"model": {"spec": "small"}, "config": {"steps": 16, "method": "midpoint"}, "clips": [{}] * 10,
               "experiments": {
                   "p1": {"summary": {"claims": [
                       paired_claim(up, claim_id="P1.a", claim="first", subset="all clips"),
                       paired_claim([1, -1] * 5, claim_id="P1.b", claim="second", subset="all clips"),
                       paired_claim(up, claim_id="P1.a", claim="first", subset="separated")]}},
                   "p6": {"summary": {"claims": [{"id": "P6.x", "claim": "raw", "values": [-v for v in up],
                                                  "direction": 1}], "grid_reduction": "fewer refresh values"}}}}
    card = scorecard(summary)
    assert [(c["id"], c["subset"]) for c in card] == [("P1.a", "all clips"), ("P1.b", "all clips"),
                                                     ("P6.x", "all clips"), ("P1.a", "separated")]
    # all-clips family of 3: 2/1024 * 3 for the two smallest (tied), p = 1 stays 1
    assert card[0]["p_holm"] == pytest.approx(3 * 2 / 1024) and card[2]["p_holm"] == pytest.approx(3 * 2 / 1024)
    assert card[3]["p_holm"] == pytest.approx(2 / 1024)  # its own family of one
    assert [c["verdict"] for c in card] == ["supported", "not supported", "opposite", "supported"]
    text = scorecard_markdown(summary)
    assert "our reconstruction" in text and "| P6.x | all clips | opposite |" in text
    assert "fewer refresh values" in text
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(folder), "--markdown", str(tmp_path / "REPORT.md")]) == 0
    assert "P1.b" in (tmp_path / "REPORT.md").read_text() and (folder / "report.html").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_limitations_v2_no_split_separated_and_holm():
    from latentflow_fast.protocol.limitations import limitations

    summary = {"clips": [{}] * 24, "experiments": {
        "p0": {"summary": {"separated_clips": ["a", "b"]}},
        "p3": {"summary": {"split": {"no_split": True, "reason": "the criteria disagree on the split"},
                           "criteria": {"map": {"stable_layers": [0], "fast_layers": [1]},
                                        "output": {"stable_layers": [1], "fast_layers": [0]}}}},
        "p4": {"summary": {}}},
        "scorecard": [{"subset": "all clips", "holm_family": "all clips", "holm_family_size": 5}]}
    text = " ".join(item["text"] for item in limitations(summary))
    assert "our reconstruction" in text and "no stable/fast split" in text and "P4 results" in text
    assert "separates 2 of 24 clips" in text and "all clips (5 tests)" in text


def test_separated_clip_ids_reads_the_first_summary_that_has_them():
    from types import SimpleNamespace

    from latentflow_fast.protocol.clips import separated_clip_ids

    ctx = SimpleNamespace(summaries={"p1": {"separated_clips": ["b"]}, "p3": {"separated_clips": ["c"]}})
    assert separated_clip_ids(ctx) == ["b"]
    assert separated_clip_ids(SimpleNamespace(summaries={})) is None


def test_clip_design_balanced_twins_and_exclusions():
    import collections

    from latentflow_fast.data import scenes, synthetic
    from latentflow_fast.protocol import clips as clips_mod

    for data in (scenes, synthetic):
        design = clips_mod.clip_design(24, 0, data)
        assert len(design) == 24 and [len(s) for s in design].count(2) == 12 and [len(s) for s in design].count(3) == 12
        for first, second in zip(design[0::2], design[1::2]):  # twins swap the prompt order on one class set
            assert (first[0], first[1]) == (second[1], second[0]) and first[2:] == second[2:]
        for slot in design:
            assert len(set(slot)) == len(slot)
            for a in slot:
                for b in slot:
                    assert frozenset({a, b}) not in clips_mod.TIMING_ONLY_PAIRS[data.__name__.rsplit(".", 1)[-1]]
        uses = collections.Counter(c for s in design for c in s)
        assert max(uses.values()) - min(uses.values()) <= 4  # classes used about equally
    assert clips_mod.clip_design(24, 0, scenes) == clips_mod.clip_design(24, 0, scenes)
    assert clips_mod.clip_design(24, 5, scenes) != clips_mod.clip_design(24, 0, scenes)
    # scenes: the counterfactual phrase has as many words as the prompt (values/weights swaps)
    for index, slot in enumerate(clips_mod.clip_design(4, 0, scenes)):
        mix = clips_mod._design_mixture(scenes, slot, index, 0)
        assert mix.classes == slot and len(mix.phrases[0].split()) == len(mix.phrases[1].split())
