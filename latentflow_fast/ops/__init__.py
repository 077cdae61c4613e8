"""The probed-attention operator: contract, validation, reference and backend dispatch."""

from .backend_cpu import cpu_info
from .backends import BACKEND_NAMES, available_backends, unavailable_reason
from .plan import CAPTURE_NAMES, AttentionPlan, build_plan
from .probed_attention import probed_attention, run_plan
from .reference import reference_attention

__all__ = [
    "BACKEND_NAMES",
    "CAPTURE_NAMES",
    "AttentionPlan",
    "available_backends",
    "build_plan",
    "cpu_info",
    "probed_attention",
    "reference_attention",
    "run_plan",
    "unavailable_reason",
]
