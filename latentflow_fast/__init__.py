"""latentflow_fast: fused probing and intervention on the attention of flow-matching audio transformers.

Start here:
    probed_attention(q, k, v, capture=("entropy",), head_gate=...)   # the operator (docs/design.md, section 2)
    cpu_info()                                                         # which CPU kernel path runs (avx512/avx2/generic)
    load_model("tiny")                                                 # the embedded SAM-Audio-architecture model
    model.separate(wave, sr, "chirp", lsac=LSACConfig(layers=(1, 2), refresh=2))  # Layer-Selective Attention Caching
"""

from .lsac import LSACConfig
from .ops import CAPTURE_NAMES, available_backends, cpu_info, probed_attention

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """Load a SAM Audio model: "tiny" (the shipped default) or a local checkpoint directory."""
    from .models import load_model as _load_model

    return _load_model(*args, **kwargs)


__all__ = ["CAPTURE_NAMES", "LSACConfig", "available_backends", "cpu_info", "load_model", "probed_attention", "__version__"]
