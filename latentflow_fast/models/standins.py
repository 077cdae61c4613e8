"""Build the shipped stand-in models (``tiny``, ``small``) from their config dicts.

A stand-in's config.json has three sections: ``codec`` and ``text_encoder`` (each with a ``type``) and
``model`` (SAMAudioConfig fields). The DiT is SAM Audio's code path; only the codec and the text encoder
are stand-ins for DAC-VAE and T5.
"""

from __future__ import annotations

import copy


def _codec_types():
    from .mdct import MDCTCodec
    from .tiny import TinyCodec

    return {"tiny_dct": TinyCodec, "mdct": MDCTCodec}


def _text_encoder_types():
    from .phrase_text import PhraseTextEncoder
    from .tiny import TinyTextEncoder

    return {"tiny_vocab": TinyTextEncoder, "phrase_transformer": PhraseTextEncoder}


def build_standin_model(config_dict: dict):
    """SAMAudio with the config's codec and text encoder attached. Weights are random."""
    from .config import SAMAudioConfig
    from .sam_audio import SAMAudio

    if not isinstance(config_dict, dict):
        raise TypeError(f"config_dict must be a dict, got {type(config_dict).__name__}")
    cfg = copy.deepcopy(config_dict)
    for key in ("codec", "text_encoder", "model"):
        if not isinstance(cfg.get(key), dict):
            raise ValueError(f"config_dict is missing the {key!r} section")
    sections = {"codec": _codec_types(), "text_encoder": _text_encoder_types()}
    built = {}
    for key, types in sections.items():
        kind = cfg[key].pop("type", None)
        if kind not in types:
            raise ValueError(f"config_dict[{key!r}]['type'] must be one of {sorted(types)}, got {kind!r}")
        built[key] = types[kind](**cfg[key])
    codec, text_encoder = built["codec"], built["text_encoder"]
    model_cfg = dict(cfg["model"])
    model_cfg.setdefault("latent_dim", codec.latent_dim)
    model_cfg.setdefault("text_dim", text_encoder.dim)
    if model_cfg["latent_dim"] != codec.latent_dim:
        raise ValueError(f"model.latent_dim ({model_cfg['latent_dim']}) must equal the codec's ({codec.latent_dim})")
    if model_cfg["text_dim"] != text_encoder.dim:
        raise ValueError(f"model.text_dim ({model_cfg['text_dim']}) must equal text_encoder.dim ({text_encoder.dim})")
    model = SAMAudio(SAMAudioConfig(**model_cfg), audio_codec=codec, text_encoder=text_encoder)
    model.standin_config = copy.deepcopy(config_dict)  # which data it goes with (data.dataset_for), its sizes
    return model
