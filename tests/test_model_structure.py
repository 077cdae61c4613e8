"""State-dict layout of the base / large presets (docs/design.md, section 3), built on the meta device."""

import json

import pytest
import torch

from latentflow_fast.models import SAMAudio, SAMAudioConfig

EXACT_TRANSFORMER_PARAMS = {"base": 1_146_918_912, "large": 2_928_828_672}


def expected_shapes(D: int, H: int, L: int, ffn: int, C: int = 128, text: int = 768, vision: int = 1024):
    hd = D // H
    shapes = {
        "proj.weight": (D, 6 * C), "proj.bias": (D,),
        "memory_proj.weight": (D, text), "memory_proj.bias": (D,),
        "align_masked_video.gate": (1,), "align_masked_video.conv.weight": (D, vision, 1),
        "align_masked_video.conv.bias": (D,), "align_masked_video.layer_norm.weight": (D,),
        "align_masked_video.layer_norm.bias": (D,),
        "embed_anchors.gate": (1,), "embed_anchors.embed.weight": (4, 128), "embed_anchors.proj.weight": (D, 128),
        "transformer.norm.weight": (D,), "transformer.output.weight": (2 * C, D),
        "transformer.final_layer_scale_shift_table": (2, D),
        "transformer.t_block.weight": (6 * D, D), "transformer.t_block.bias": (6 * D,),
        "transformer.t_embedder.projection.w1.weight": (D, 256),
        "transformer.t_embedder.projection.w2.weight": (D, D),
        "transformer.t_embedder.projection.w3.weight": (D, 256),
        "transformer.y_embedder.projection.w1.weight": (D, D),
        "transformer.y_embedder.projection.w2.weight": (D, D),
        "transformer.y_embedder.projection.w3.weight": (D, D),
    }
    for blk in ("block1", "block2"):
        p = f"transformer.x_embedder.block.{blk}"
        shapes.update({f"{p}.groupnorm.weight": (D,), f"{p}.groupnorm.bias": (D,),
                       f"{p}.project.weight": (D, D, 3), f"{p}.project.bias": (D,)})
    for i in range(L):
        p = f"transformer.layers.{i}"
        shapes[f"{p}.scale_shift_table"] = (6, D)
        for attn in ("attention", "cross_attention"):
            for w in ("wq", "wk", "wv", "wo"):
                shapes[f"{p}.{attn}.{w}.weight"] = (D, D)
            shapes[f"{p}.{attn}.q_norm.weight"] = (hd,)
            shapes[f"{p}.{attn}.k_norm.weight"] = (hd,)
        shapes[f"{p}.feed_forward.w1.weight"] = (ffn, D)
        shapes[f"{p}.feed_forward.w3.weight"] = (ffn, D)
        shapes[f"{p}.feed_forward.w2.weight"] = (D, ffn)
        shapes[f"{p}.attention_norm.weight"] = (D,)
        shapes[f"{p}.ffn_norm.weight"] = (D,)
    return shapes


@pytest.mark.parametrize("name,D,H,L,ffn", [("base", 2048, 16, 16, 5504), ("large", 2816, 22, 22, 7552)])
def test_preset_state_dict_keys_shapes_and_counts(name, D, H, L, ffn):
    cfg = SAMAudioConfig.preset(name)
    assert (cfg.dim, cfg.n_heads, cfg.n_layers, cfg.head_dim, cfg.ffn_hidden_dim) == (D, H, L, 128, ffn)
    with torch.device("meta"):
        model = SAMAudio(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_shapes(D, H, L, ffn)
    n_transformer = sum(v.numel() for k, v in model.state_dict().items() if k.startswith("transformer."))
    assert n_transformer == EXACT_TRANSFORMER_PARAMS[name]
    # the rounded figures (1.152e9 / 2.936e9) count the modules outside `transformer.` too
    n_all = sum(v.numel() for v in model.state_dict().values())
    assert abs(n_all / {"base": 1.152e9, "large": 2.936e9}[name] - 1) < 1e-3


def test_config_json_round_trip(tmp_path):
    cfg = SAMAudioConfig.preset("large", text_encoder={"name": "t5-base"})
    path = tmp_path / "config.json"
    cfg.to_json(str(path))
    assert SAMAudioConfig.from_json(str(path)) == cfg
    assert SAMAudioConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_sam_audio_config_json_mapping():
    sam = {
        "in_channels": 768,
        "audio_codec": {"codebook_dim": 128, "latent_dim": 1024, "encoder_rates": [2, 8, 10, 12]},
        "text_encoder": {"name": "t5-base", "dim": 768},
        "vision_encoder": {"dim": 1024},
        "transformer": {"dim": 2816, "n_heads": 22, "n_layers": 22, "context_dim": 2816, "out_channels": 256,
                        "max_positions": 10000, "dropout": 0.1, "qk_norm": True},
        "num_anchors": 3, "anchor_embedding_dim": 128, "span_predictor": "pe-a-frame-large",
    }
    cfg = SAMAudioConfig.from_dict(sam)
    assert cfg == SAMAudioConfig.preset("large", audio_codec=sam["audio_codec"], text_encoder=sam["text_encoder"],
                                        extra={"span_predictor": "pe-a-frame-large"})
    assert cfg.rope_theta == 20000.0 and cfg.dropout == 0.0


def test_config_errors():
    with pytest.raises(ValueError, match="name"):
        SAMAudioConfig.preset("huge")
    with pytest.raises(ValueError, match="n_heads"):
        SAMAudioConfig(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="context_dim"):
        SAMAudioConfig(dim=64, n_heads=4, context_dim=32)
    with pytest.raises(ValueError, match="unknown"):
        SAMAudioConfig.from_dict({"dim": 64, "bogus": 1})
    with pytest.raises(TypeError, match="config"):
        SAMAudio({"dim": 64})
