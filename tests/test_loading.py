"""load_model: directories (checkpoint.pt / safetensors, our config or SAM Audio's), strict key matching."""

import json

import pytest
import torch
from safetensors.torch import save_file

from latentflow_fast.models import check_state_dict, load_model
from latentflow_fast.models.loading import SHIPPED_MODELS, TINY_DIR
from model_fixtures import random_inputs, small_model


def save_dir(path, model, fmt="pt", state=None):
    path.mkdir(exist_ok=True)
    model.config.to_json(str(path / "config.json"))
    state = dict(model.state_dict()) if state is None else state
    if fmt == "pt":
        torch.save(state, path / "checkpoint.pt")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_round_trip_bitwise(tmp_path, fmt):
    model = small_model(with_codec=False, vision_dim=6, num_anchors=3)
    loaded = load_model(save_dir(tmp_path / "m", model, fmt))
    assert not loaded.training
    inputs = random_inputs(model)
    assert torch.equal(model(*inputs), loaded(*inputs))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_dtype_argument(tmp_path):
    model = small_model(with_codec=False)
    loaded = load_model(save_dir(tmp_path / "m", model), dtype=torch.float64)
    assert loaded.proj.weight.dtype == torch.float64
    with pytest.raises(TypeError, match="dtype"):
        load_model(tmp_path / "m", dtype=torch.int32)


def test_missing_unexpected_and_mismatched_reported_together(tmp_path):
    model = small_model(with_codec=False)
    state = dict(model.state_dict())
    del state["transformer.layers.1.attention.wq.weight"]
    state["transformer.layers.9.attention.wq.weight"] = torch.zeros(3)
    state["proj.bias"] = torch.zeros(5)
    save_dir(tmp_path / "bad", model, state=state)
    with pytest.raises(ValueError) as info:
        load_model(tmp_path / "bad")
    msg = str(info.value)
    assert "1 missing key(s): transformer.layers.1.attention.wq.weight" in msg
    assert "1 unexpected key(s): transformer.layers.9.attention.wq.weight" in msg
    assert "proj.bias: checkpoint (5,) vs model (32,)" in msg


def test_long_key_lists_are_truncated():
    expected = {f"k{i}": torch.Size([1]) for i in range(100)}
    with pytest.raises(ValueError, match=r"100 missing key\(s\).*and 80 more"):
        check_state_dict(expected, {})


def test_sam_audio_layout_and_ignored_parts(tmp_path):
    """A directory in SAM Audio's format: nested config.json, extra parts skipped explicitly."""
    model = small_model(with_codec=False, vision_dim=6, num_anchors=3, latent_dim=16, text_dim=8)
    cfg = model.config
    sam_config = {
        "in_channels": 6 * 16,
        "audio_codec": {"codebook_dim": 16},
        "text_encoder": {"dim": 8},
        "vision_encoder": {"dim": 6},
        "transformer": {"dim": cfg.dim, "n_heads": cfg.n_heads, "n_layers": cfg.n_layers, "context_dim": cfg.dim,
                        "out_channels": 32, "multiple_of": 16},
        "num_anchors": 3, "anchor_embedding_dim": 128,
    }
    d = tmp_path / "sam"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(sam_config))
    state = dict(model.state_dict())
    state["vision_encoder.model.proj"] = torch.zeros(2)
    state["span_predictor.x"] = torch.zeros(1)
    torch.save(state, d / "checkpoint.pt")
    with pytest.warns(UserWarning, match="vision_encoder"):
        loaded = load_model(d)
    assert loaded.load_report["ignored"] == {"vision_encoder.": 1, "span_predictor.": 1}
    inputs = random_inputs(model)
    assert torch.equal(model(*inputs), loaded(*inputs))


def test_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(TypeError, match="name_or_path"):
        load_model(3)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_shipped_missing_assets_message(monkeypatch, tmp_path, name):
    monkeypatch.setitem(SHIPPED_MODELS, name, tmp_path)
    with pytest.raises(FileNotFoundError, match=f"the {name} model's assets are missing"):
        load_model(name)


@pytest.mark.skipif(not (TINY_DIR / "model.safetensors").is_file(), reason="tiny assets not built yet")
def test_tiny_loads():
    import latentflow_fast

    model = latentflow_fast.load_model("tiny")
    assert model.audio_codec is not None and model.text_encoder is not None
