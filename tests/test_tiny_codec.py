import pytest
import torch

from latentflow_fast.models.codecs import AudioCodec
from latentflow_fast.models.tiny import TINY_VOCABULARY, TinyCodec, TinyTextEncoder, dct_matrix


def test_dct_matrix_is_orthonormal():
    m = dct_matrix(64)
    torch.testing.assert_close(m @ m.T, torch.eye(64, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("hop", [64, 128])
def test_codec_is_exactly_invertible_both_ways(hop):
    codec = TinyCodec(hop=hop)
    assert isinstance(codec, AudioCodec)
    g = torch.Generator().manual_seed(0)
    wave = 0.1 * torch.randn(3, 32_000, generator=g)
    latent = codec.encode(wave)
    assert latent.shape == (3, 32_000 // hop, hop)
    torch.testing.assert_close(codec.decode(latent), wave, atol=1e-6, rtol=0)
    z = torch.randn(2, 10, hop, generator=g)
    torch.testing.assert_close(codec.encode(codec.decode(z)), z, atol=1e-5, rtol=0)
    # float64 round trip is exact to double precision
    torch.testing.assert_close(codec.decode(codec.encode(wave.double())), wave.double(), atol=1e-13, rtol=0)


def test_codec_properties_shapes_and_padding():
    codec = TinyCodec(sample_rate=16_000, hop=64, scale=10.0)
    assert codec.sample_rate == 16_000 and codec.hop_length == 64 and codec.latent_dim == 64
    assert codec.frame_rate == 250.0
    latent = codec.encode(torch.ones(1, 100))
    assert latent.shape == (1, 2, 64)  # tail zero-padded
    assert codec.decode(latent).shape == (1, 128)
    assert codec.encode(torch.zeros(50)).shape == (1, 1, 64)  # 1-D input is one row
    assert list(codec.state_dict()) == []  # the DCT basis is not saved


def test_codec_scale_gives_unit_variance_for_rms_point_one():
    codec = TinyCodec(hop=64)
    wave = 0.1 * torch.randn(4, 32_000, generator=torch.Generator().manual_seed(1))
    assert abs(float(codec.encode(wave).std()) - 1.0) < 0.02


def test_codec_bad_input():
    codec = TinyCodec(hop=64)
    with pytest.raises(ValueError, match="latent"):
        codec.decode(torch.zeros(1, 3, 32))
    with pytest.raises(TypeError, match="wave"):
        codec.encode(torch.zeros(1, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="hop"):
        TinyCodec(hop=0)


def test_text_encoder_tokens_mask_and_vocabulary_error():
    enc = TinyTextEncoder(dim=16)
    feats, mask = enc(["sine tone", "chirp", "  White   NOISE "])
    assert feats.shape == (3, 2, 16) and feats.dtype == torch.float32
    assert mask.tolist() == [[True, True], [True, False], [True, True]]
    assert torch.all(feats[1, 1] == 0)
    torch.testing.assert_close(feats[2], enc(["white noise"])[0][0])
    with pytest.raises(ValueError, match="vocabulary") as err:
        enc(["violin"])
    for word in TINY_VOCABULARY:
        assert word in str(err.value)
    with pytest.raises(ValueError, match="prompt"):
        enc([" "])
    assert sorted(k for k, _ in enc.named_parameters()) == ["position_embedding", "token_embedding.weight"]
