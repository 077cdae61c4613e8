"""Text encoders: precomputed tables, the optional T5 encoder's errors, attaching one in load_model."""

import importlib.util

import pytest
import torch

from latentflow_fast.models import PrecomputedTextEncoder, T5TextEncoder, load_model
from model_fixtures import small_model


def test_precomputed_pads_and_masks(tmp_path):
    table = {"a": torch.ones(2, 4), "b c": torch.full((3, 4), 2.0)}
    enc = PrecomputedTextEncoder(table)
    feats, mask = enc(["b c", "a"])
    assert enc.dim == 4 and feats.shape == (2, 3, 4) and feats.dtype == torch.float32
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    assert torch.equal(feats[1, 2], torch.zeros(4))
    path = tmp_path / "table.pt"
    torch.save(table, path)
    assert torch.equal(PrecomputedTextEncoder(str(path))(["a"])[0], enc(["a"])[0])


def test_precomputed_errors(tmp_path):
    enc = PrecomputedTextEncoder({"a": torch.ones(2, 4)})
    with pytest.raises(ValueError, match="known: \\['a'\\]"):
        enc(["zebra"])
    with pytest.raises(TypeError, match="prompts"):
        enc("a")
    with pytest.raises(ValueError, match="one dim"):
        PrecomputedTextEncoder({"a": torch.ones(2, 4), "b": torch.ones(2, 5)})
    with pytest.raises(FileNotFoundError, match="table"):
        PrecomputedTextEncoder(str(tmp_path / "missing.pt"))


def test_t5_needs_local_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        T5TextEncoder(tmp_path / "no-such-t5")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_t5_without_transformers_says_how_to_install(tmp_path):
    with pytest.raises(ImportError, match="pip install transformers"):
        T5TextEncoder(tmp_path)


def test_load_model_attaches_text_encoder(tmp_path):
    model = small_model(with_codec=False)
    model.config.to_json(str(tmp_path / "config.json"))
    torch.save(model.state_dict(), tmp_path / "checkpoint.pt")
    enc = PrecomputedTextEncoder({"dog": torch.randn(2, 8)})
    assert load_model(tmp_path, text_encoder=enc).text_encoder is enc
    with pytest.raises(ValueError, match="text_encoder"):
        load_model(tmp_path, text_encoder=PrecomputedTextEncoder({"dog": torch.randn(2, 5)}))
