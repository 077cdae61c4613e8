"""One vocabulary of attention interventions, shared by `Probe` (the sweep engine) and `Trace` (hooks).

Every word has one meaning, stated here, and maps to the probed operator's per-(row, head) arguments
(`ops.probed_attention`: head_gate, logit_scale, segment_bias, out_patch/patch_mask, out_bias). With s the
scaled logits q.k / sqrt(d) of one head:

    temperature T     softmax(s / T), as in every sampling API: T > 1 flattens, T < 1 sharpens, T = inf is
                      uniform attention over the unmasked keys; T = 1 changes nothing. logit_scale = 1 / T.
    logit_scale c     softmax(c * s): the operator's own argument; c = 0 is uniform attention, c = 1 nothing.
    head_ablation g   head output multiplied by g (default 0): head_gate.
    ...               (the table INTERVENTIONS below)

Changed meaning: until this vocabulary existed `Probe(intervention="temperature", value=v)` *multiplied* the
logits by v (v = 0: uniform), the opposite of `Trace.set_temperature`. A temperature probe now divides;
the old meaning is `logit_scale`. A temperature of 0 (the old spelling of "uniform") is refused with that
advice, and temperature probes get new probe ids, so results stored under the old meaning are never reused
for the new one.
"""

from __future__ import annotations

import math
import warnings

INTERVENTIONS = {
    "none": "no change (a control row; its effects are exactly zero)",
    "head_ablation": "head output multiplied by `value` (default 0): head_gate",
    "mean_ablation": "head output replaced by its time-mean in the clean run at the same evaluation",
    "temperature": "softmax(logits / `value`): T > 1 flattens, T < 1 sharpens, inf = uniform attention over "
                   "unmasked keys (logit_scale = 1 / T)",
    "logit_scale": "softmax(`value` * logits): 0 = uniform attention over unmasked keys, 1 = no change",
    "segment_knockout": "keys of the listed `segments` get -inf logits (attention knockout)",
    "segment_bias": "`value` added to the logits of the listed `segments`",
    "output_patch": "head output replaced by the cached output of run `source` (at `source_evaluation` or the "
                    "same evaluation)",
    "output_bias": "`value` * steering vector `source` (registered with ProbeEngine.add_vector) added to the "
                   "head output",
    "additive_swap": "time-mean of the head output replaced by that of run `source` (the 'additive injection')",
    "routing_swap": "frame-varying part of the head output replaced by that of run `source` (the 'routing')",
}
NEEDS_SOURCE = {"output_patch", "output_bias", "additive_swap", "routing_swap"}
NEEDS_SEGMENTS = {"segment_knockout", "segment_bias"}
# the value at which an intervention changes nothing (the engine runs such probes as control rows)
IDENTITY_VALUE = {"head_ablation": 1.0, "temperature": 1.0, "logit_scale": 1.0, "segment_bias": 0.0,
                  "output_bias": 0.0}

TEMPERATURE_CHANGED = (
    "intervention 'temperature' now divides the logits, softmax(logits / T), as sampling APIs and "
    "Trace.set_temperature do; it used to multiply them. For the old meaning use intervention='logit_scale' "
    "(value 0 = uniform attention), or temperature=float('inf') for uniform attention")
_warned = False


def check_temperature(temperature, name: str = "temperature") -> float:
    """A valid temperature T (> 0, inf allowed) as a float; 0 and negatives are refused with the advice."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if temperature == 0.0:
        raise ValueError(f"{name} 0 is not a temperature (softmax(s / 0) is undefined); {TEMPERATURE_CHANGED}")
    if not temperature > 0:  # negatives and NaN
        raise ValueError(f"{name} must be > 0 (float('inf') = uniform attention), got {temperature}")
    return temperature


def check_logit_scale(scale, name: str = "logit_scale") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"{name} must be a finite float, got {scale!r}")
    return float(scale)


def logit_scale(kind: str, value: float) -> float:
    """The operator's logit_scale for a "temperature" or "logit_scale" intervention of `value`."""
    if kind == "temperature":
        return 0.0 if math.isinf(value) else 1.0 / value
    if kind == "logit_scale":
        return float(value)
    raise ValueError(f"kind: {kind!r} does not act on the logit scale")


def check_probe_value(kind: str, value: float) -> None:
    """Refuse values an intervention has no meaning for (raised from Probe.__post_init__)."""
    if kind == "temperature":
        check_temperature(value, "value (a temperature)")
        warn_temperature_changed()
    elif kind == "logit_scale":
        check_logit_scale(value, "value (a logit scale)")


def warn_temperature_changed() -> None:
    """Once per process: temperature probes mean something else than they did before this vocabulary."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(TEMPERATURE_CHANGED, FutureWarning, stacklevel=5)  # the Probe(...) call


def is_identity(kind: str, value: float) -> bool:
    return kind == "none" or (kind in IDENTITY_VALUE and value == IDENTITY_VALUE[kind])


def is_uniform(kind: str, value: float) -> bool:
    """Uniform attention over the unmasked keys: logit_scale 0, or temperature inf."""
    return (kind == "logit_scale" and value == 0.0) or (kind == "temperature" and math.isinf(value))
