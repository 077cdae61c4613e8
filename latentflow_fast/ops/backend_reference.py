"""Backend "reference": the eager oracle (materialises the map, float64 inside)."""

from typing import Optional

from .plan import AttentionPlan
from .reference import reference_backend

# Queries per chunk: bounds the materialised map to [B, H, 1024, Nk].
QUERY_CHUNK = 1024


def unavailable_reason() -> Optional[str]:
    return None


def run(plan: AttentionPlan):
    return reference_backend(plan, query_chunk=QUERY_CHUNK)
