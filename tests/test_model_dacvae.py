"""DAC-VAE codec: SAM Audio's key layout, frame arithmetic, loading inside a SAM Audio directory."""

import json

import torch

from latentflow_fast.models import DACVAE, load_model
from model_fixtures import small_config

SMALL = dict(encoder_dim=4, encoder_rates=(2, 4), latent_dim=16, decoder_dim=48, decoder_rates=(4, 2),
             codebook_dim=8, sample_rate=8000, wm_rates=(2, 2))


def test_full_size_layout_on_meta():
    with torch.device("meta"):
        codec = DACVAE()
    sd = codec.state_dict()
    assert (codec.sample_rate, codec.hop_length, codec.latent_dim, codec.frame_rate) == (48000, 1920, 128, 25.0)
    assert tuple(sd["quantizer.in_proj.weight_v"].shape) == (256, 1024, 1)  # mean and scale halves
    assert tuple(sd["quantizer.out_proj.weight_v"].shape) == (1024, 128, 1)
    assert tuple(sd["encoder.block.0.weight_v"].shape) == (64, 1, 7)
    assert tuple(sd["decoder.model.0.weight_v"].shape) == (1536, 1024, 7)
    assert tuple(sd["decoder.model.1.block.1.weight_g"].shape) == (1536, 1, 1)  # transposed conv: dim 0 = in
    assert tuple(sd["decoder.wm_model.encoder_block.post.0.lstm.weight_ih_l1"].shape) == (2048, 512)
    assert tuple(sd["decoder.wm_model.msg_processor.msg_processor.weight"].shape) == (32, 128)
    assert {k.split(".")[0] for k in sd} == {"encoder", "quantizer", "decoder"}
    assert len(sd) == 317


def test_frames_and_determinism():
    torch.manual_seed(0)
    codec = DACVAE(**SMALL).eval()
    wave = torch.randn(2, 100)
    z = codec.encode(wave)
    assert z.shape == (2, 13, 8)  # ceil(100 / 8)
    out = codec.decode(z)
    assert out.shape == (2, 104) and torch.isfinite(out).all()
    assert torch.equal(out, codec.decode(z))
    torch.testing.assert_close(codec.decode(z[:1]), out[:1], atol=1e-6, rtol=0)


def test_sam_directory_with_codec(tmp_path):
    from latentflow_fast.models import SAMAudio

    cfg = small_config(latent_dim=8)
    torch.manual_seed(0)
    model = SAMAudio(cfg, audio_codec=DACVAE(**SMALL))
    sam_config = {
        "in_channels": 48, "audio_codec": {k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.items()},
        "text_encoder": {"dim": cfg.text_dim}, "vision_encoder": {"dim": 0}, "num_anchors": 0,  # no video/anchor paths
        "transformer": {"dim": cfg.dim, "n_heads": cfg.n_heads, "n_layers": cfg.n_layers, "context_dim": cfg.dim,
                        "out_channels": 16, "multiple_of": cfg.multiple_of},
    }
    (tmp_path / "config.json").write_text(json.dumps(sam_config))
    torch.save(model.state_dict(), tmp_path / "checkpoint.pt")
    loaded = load_model(tmp_path)
    assert isinstance(loaded.audio_codec, DACVAE)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
