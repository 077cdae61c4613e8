"""Probing: declarative probes, the batched sweep engine, and hook-style tracing for any module."""

from .._extras import require as _require

_require("pandas", "probe", "latentflow_fast.probe (sweeps and result stores)")
_require("pyarrow", "probe", "latentflow_fast.probe (Parquet result stores)")

from .engine import Clip, ProbeEngine, Trajectory, model_sites, shard_of, time_bins  # noqa: E402
from .probes import INTERVENTIONS, REUSE_WHAT, STANDARD_KINDS, MapRequest, Probe, Reduction, Reuse, expand_sites, per_head, probe_grid, standard_probes  # noqa: E402
from .store import ResultStore  # noqa: E402

__all__ = [
    "INTERVENTIONS",
    "STANDARD_KINDS",
    "standard_probes",
    "Clip",
    "MapRequest",
    "Probe",
    "REUSE_WHAT",
    "Reduction",
    "Reuse",
    "ProbeEngine",
    "ResultStore",
    "Trajectory",
    "expand_sites",
    "model_sites",
    "per_head",
    "probe_grid",
    "shard_of",
    "time_bins",
]

# Hook-style API (trace, run_with_cache, run_with_hooks) for any nn.Module.
from .hooks import *  # noqa: E402,F401,F403
from .hooks import __all__ as _hooks_all  # noqa: E402

__all__ += list(_hooks_all)
