"""End effects of a probe on the separated output: semantic (which source comes out) and acoustic (how).

Notation: A = the prompted source, B = the counterfactual source (another source of the same mix, named
by the counterfactual prompt). ``out`` = the probe's decoded target output; ``clean`` = the clean
A-prompted output; ``cf`` = the clean output of the run prompted with B (same noise).

Semantic effect
---------------
* With stems: margin m(x) = SI-SDR(x, s_B) - SI-SDR(x, s_A) in dB. ``semantic_shift_db`` = m(out) - m(clean);
  ``semantic_gap_db`` = m(cf) - m(clean) (how far prompting B moves the output);
  ``semantic_effect`` = shift / gap: 0 = no movement, 1 = moved as far toward B as prompting B does,
  negative = moved away from B. When the gap is below ``GAP_FLOOR_DB`` (1 dB: the model itself barely
  reacts to the prompt change on this clip) the ratio is undefined and set to NaN; the dB shift stays.
* Without stems (user audio): ``semantic_effect`` = the projection coefficient of out on the segment
  clean -> cf in waveform space, <out - clean, cf - clean> / |cf - clean|^2 (0 = clean, 1 = cf).
  ``semantic_projection`` holds this coefficient for every clip, with or without stems.
* ``identity_flipped``: out has a higher SI-SDR to s_B than to s_A (with stems).

Acoustic effect
---------------
Distance to the clean output *of the identity the output has* (so that a change of identity is not
counted twice): the reference is ``clean`` if SI-SDR(out, clean) >= SI-SDR(out, cf), else ``cf``
(``acoustic_reference``). ``acoustic_mrstft`` = multi-resolution STFT distance (spectral convergence +
log-magnitude L1 at FFT sizes 256/512/1024), ``acoustic_logmel`` = mean |log-mel difference| (64 mels);
``acoustic_effect`` = ``acoustic_mrstft``. Without a counterfactual run the reference is always ``clean``.

An identity intervention leaves out == clean bitwise, so every effect above is exactly 0.

Protocol v2 effects (issue 13; the primary P1 effects)
------------------------------------------------------
The audit found the margin ratio unstable (gaps of 12-109 dB) and the MR-STFT distance dominated by
where the output sits between the two identities. v2 works in waveform space, on the *active samples*
(where A or B plays; every sample without interval information):

* identity plane: least squares of the output on the reference stems, out ~ alpha s_A + beta s_B
  (+ the mixture's other stems as nuisance regressors); ``identity_position`` = beta / (|alpha| + |beta|)
  (0 = pure A, 1 = pure B, NaN when both are 0).
* ``semantic_v2`` = position(out) - position(clean) (in [-2, 2]; the gap ``semantic_v2_gap`` =
  position(cf) - position(clean) says how far prompting B moves it).
* ``acoustic_v2`` = ||P_perp (out - clean)|| / ||clean|| on the active samples, P_perp = the projector
  orthogonal to the span of the stems: a change of *how* it sounds, with the identity axis (and any
  re-weighting of the stems) removed. A pure identity move out = clean + c s_B gives acoustic_v2 = 0.
* Without stems: position = the projection coefficient on clean -> cf (as ``semantic_projection``) and
  P_perp removes the clean -> cf direction.
Both are exactly 0 when out == clean.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .. import metrics

GAP_FLOOR_DB = 1.0


def semantic_margin(outputs: torch.Tensor, source_a: torch.Tensor, source_b: torch.Tensor) -> torch.Tensor:
    """SI-SDR(out, B) - SI-SDR(out, A) in dB for outputs [R, S] (float64 [R]).

    Row by row, so a row equal to another call's input gives a bitwise equal margin (exact zero shifts).
    """
    outputs = torch.as_tensor(outputs)
    outputs = outputs.reshape(-1, outputs.shape[-1])
    a = torch.as_tensor(source_a).reshape(1, -1)
    b = torch.as_tensor(source_b).reshape(1, -1)
    return torch.cat([metrics.si_sdr(row[None], b) - metrics.si_sdr(row[None], a) for row in outputs])


def projection_coefficient(outputs: torch.Tensor, clean: torch.Tensor, counterfactual: torch.Tensor) -> torch.Tensor:
    """<out - clean, cf - clean> / |cf - clean|^2 per row (float64 [R]); NaN if cf == clean."""
    out = torch.as_tensor(outputs, dtype=torch.float64).reshape(-1, outputs.shape[-1])
    c = torch.as_tensor(clean, dtype=torch.float64).reshape(1, -1)
    direction = torch.as_tensor(counterfactual, dtype=torch.float64).reshape(1, -1) - c
    norm = float((direction * direction).sum())
    if norm == 0.0:
        return torch.full((out.shape[0],), math.nan, dtype=torch.float64)
    return ((out - c) * direction).sum(-1) / norm


def effect_rows(outputs: torch.Tensor, clean: torch.Tensor, counterfactual: Optional[torch.Tensor] = None,
                source_a: Optional[torch.Tensor] = None, source_b: Optional[torch.Tensor] = None,
                sample_rate: int = 16_000) -> list[dict]:
    """Semantic and acoustic effects (module docstring) of outputs [R, S], one dict per row."""
    outputs = torch.as_tensor(outputs, dtype=torch.float32)
    if outputs.dim() != 2:
        raise ValueError(f"outputs must be [R, S], got shape {tuple(outputs.shape)}")
    R = outputs.shape[0]
    clean = torch.as_tensor(clean, dtype=torch.float32).reshape(1, -1)
    if clean.shape[-1] != outputs.shape[-1]:
        raise ValueError("clean must have as many samples as outputs")
    nan = torch.full((R,), math.nan, dtype=torch.float64)
    shift, gap, effect, margin, flipped = nan, math.nan, nan.clone(), nan, [None] * R
    projection = nan
    use_cf = torch.zeros(R, dtype=torch.bool)
    if counterfactual is not None:
        cf = torch.as_tensor(counterfactual, dtype=torch.float32).reshape(1, -1)
        projection = projection_coefficient(outputs, clean, cf)
        effect = projection.clone()
        use_cf = metrics.si_sdr(outputs, cf.expand_as(outputs)) > metrics.si_sdr(outputs, clean.expand_as(outputs))
        if source_a is not None and source_b is not None:
            margin = semantic_margin(outputs, source_a, source_b)
            m_clean = semantic_margin(clean, source_a, source_b)[0]
            gap = float(semantic_margin(cf, source_a, source_b)[0] - m_clean)
            shift = margin - m_clean
            effect = shift / gap if gap >= GAP_FLOOR_DB else nan.clone()
            flipped = [bool(m > 0) for m in margin.tolist()]
        reference = torch.where(use_cf[:, None], cf.expand_as(outputs), clean.expand_as(outputs))
    else:
        reference = clean.expand_as(outputs)
    mrstft = metrics.multi_resolution_stft_distance(outputs, reference)
    logmel = metrics.log_mel_distance(outputs, reference, sample_rate=sample_rate)
    rows = []
    for r in range(R):
        rows.append({
            "semantic_effect": float(effect[r]),
            "semantic_shift_db": float(shift[r]),
            "semantic_gap_db": float(gap),
            "semantic_margin_db": float(margin[r]),
            "semantic_projection": float(projection[r]),
            "identity_flipped": flipped[r],
            "acoustic_effect": float(mrstft[r]),
            "acoustic_mrstft": float(mrstft[r]),
            "acoustic_logmel": float(logmel[r]),
            "acoustic_reference": "counterfactual" if bool(use_cf[r]) else "clean",
        })
    return rows


def _active_mask(pclip, num_samples: int) -> np.ndarray:
    """bool [S]: samples inside the target's or the counterfactual's interval (all if unknown)."""
    mask = np.zeros(num_samples, dtype=bool)
    known = False
    for key in ("target_interval", "counterfactual_interval"):
        interval = (pclip.meta or {}).get(key) if pclip is not None else None
        if interval is not None:
            mask[int(interval[0]):int(interval[1])] = True
            known = True
    return mask if known and mask.any() else np.ones(num_samples, dtype=bool)


def identity_effects(outputs, clean, counterfactual=None, source_a=None, source_b=None, others=(),
                     active=None) -> list[dict]:
    """semantic_v2 / acoustic_v2 (module docstring) of outputs [R, S], one dict per row (float64 maths)."""
    out = np.asarray(torch.as_tensor(outputs, dtype=torch.float64).reshape(-1, np.shape(outputs)[-1]))
    S = out.shape[1]
    mask = np.ones(S, dtype=bool) if active is None else np.asarray(active, dtype=bool).reshape(-1)
    if mask.shape != (S,):
        raise ValueError(f"active must have {S} entries, got {mask.shape}")
    c = np.asarray(torch.as_tensor(clean, dtype=torch.float64).reshape(-1))[mask]
    cf = None if counterfactual is None else np.asarray(torch.as_tensor(counterfactual, dtype=torch.float64).reshape(-1))[mask]
    o = out[:, mask]
    if source_a is not None and source_b is not None:
        basis = [np.asarray(torch.as_tensor(x, dtype=torch.float64).reshape(-1))[mask]
                 for x in (source_a, source_b, *others)]
        X = np.stack(basis, axis=1)  # [S_active, n_stems]

        def position(y):
            coef = np.linalg.lstsq(X, y.T, rcond=None)[0]  # [n_stems, rows]
            a, b = coef[0], coef[1]
            den = np.abs(a) + np.abs(b)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(den > 0, b / np.where(den > 0, den, 1.0), np.nan)
    elif cf is not None:
        X = (cf - c)[:, None]

        def position(y):
            d = X[:, 0]
            norm = float(d @ d)
            return (y - c) @ d / norm if norm > 0 else np.full(y.shape[0], np.nan)
    else:
        X = np.zeros((o.shape[1], 0))
        position = None
    if position is not None:
        p_clean = position(c[None])[0]
        p_out = position(o)
        p_cf = position(cf[None])[0] if cf is not None else np.nan
    delta = o - c[None]
    if X.shape[1]:
        Q, _ = np.linalg.qr(X)
        delta = delta - (delta @ Q) @ Q.T  # remove the identity plane
    clean_norm = float(np.linalg.norm(c))
    acoustic = np.linalg.norm(delta, axis=1) / clean_norm if clean_norm > 0 else np.full(o.shape[0], np.nan)
    # identical rows give exactly 0 (the projection above is not exact in floating point)
    same = np.all(o == c[None], axis=1)
    rows = []
    for r in range(o.shape[0]):
        if position is None:
            sem, gap, pos = math.nan, math.nan, math.nan
        else:
            sem = 0.0 if same[r] else float(p_out[r] - p_clean)
            gap, pos = float(p_cf - p_clean), float(p_out[r])
        rows.append({"semantic_v2": sem, "semantic_v2_gap": gap, "identity_position": pos,
                     "acoustic_v2": 0.0 if same[r] else float(acoustic[r])})
    return rows


def make_end_metrics(pclip, clean, counterfactual=None, extra: Optional[dict] = None):
    """An `end_metrics` function for ProbeEngine.sweep that adds the effects above to every row.

    pclip: the ProtocolClip (stems, target/counterfactual indices); clean / counterfactual: Trajectory of the
    clean A-prompted run and of the B-prompted run (None: semantic effects are NaN). `extra`: constant
    columns added to every row (e.g. the clip's complexity group). The result is picklable (an instance of a
    module-level class), so sweeps with worker processes can send it to them.
    """
    source_a = source_b = None
    if pclip.sources is not None and pclip.counterfactual_index is not None:
        source_a = pclip.sources[pclip.target_index]
        source_b = pclip.sources[pclip.counterfactual_index]
    cf_wave = None if counterfactual is None else counterfactual.target
    others = ()
    if source_a is not None:
        others = tuple(pclip.sources[i] for i in range(pclip.sources.shape[0])
                       if i not in (pclip.target_index, pclip.counterfactual_index))
    return EndMetrics(clean.target, cf_wave, source_a, source_b, dict(clip_columns(pclip), **(extra or {})),
                      others=others, pclip=pclip)



class EndMetrics:
    """effect_rows and the v2 identity effects of a sweep's decoded outputs against one clip's clean (and
    counterfactual) output, plus constant columns (see make_end_metrics). A module-level class, so that
    sweeps with worker processes can pickle it."""

    def __init__(self, clean_wave, cf_wave, source_a, source_b, constant: dict, others=(), pclip=None):
        self.clean_wave, self.cf_wave = clean_wave, cf_wave
        self.source_a, self.source_b = source_a, source_b
        self.constant = constant
        self.others = others
        self.intervals = _Intervals(pclip)

    def __call__(self, target_waves, residual_waves, traj) -> list[dict]:
        rows = effect_rows(target_waves, self.clean_wave, self.cf_wave, self.source_a, self.source_b,
                           sample_rate=traj.inputs.sample_rate)
        v2 = identity_effects(target_waves, self.clean_wave, self.cf_wave, self.source_a, self.source_b,
                              self.others, active=_active_mask(self.intervals, target_waves.shape[-1]))
        return [dict(row, **extra_row, **self.constant) for row, extra_row in zip(rows, v2)]


class _Intervals:
    """The part of a ProtocolClip that _active_mask reads (its meta), small enough to pickle."""

    def __init__(self, pclip):
        meta = (pclip.meta or {}) if pclip is not None else {}
        self.meta = {k: meta[k] for k in ("target_interval", "counterfactual_interval") if k in meta}


def clip_columns(pclip) -> dict:
    """Per-clip grouping columns carried into every result row."""
    return {
        "group": pclip.group,
        "gain_group": str(pclip.meta.get("gain_group", "")),
        "prompt": pclip.clip.prompt,
        "counterfactual_prompt": pclip.counterfactual_prompt or "",
    }


def json_ready(value):
    """Make a summary JSON-serialisable: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value
