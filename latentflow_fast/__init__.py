"""latentflow_fast: fused probing and intervention on the attention of flow-matching audio transformers.

Start here:
    probed_attention(q, k, v, capture=("entropy",), head_gate=...)   # the operator (DESIGN.md section 3)
    load_model("tiny")                                                 # the embedded SAM-Audio-architecture model
"""

from .ops import CAPTURE_NAMES, available_backends, probed_attention

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """Load a SAM Audio model: "tiny" (the shipped default) or a local checkpoint directory."""
    from .models import load_model as _load_model

    return _load_model(*args, **kwargs)


__all__ = ["CAPTURE_NAMES", "available_backends", "load_model", "probed_attention", "__version__"]
