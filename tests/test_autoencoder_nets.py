"""First-stage networks: encoder/decoder shapes at f = 4 and 8, the decoder's last layer, where
attention goes, bad arguments, and the PatchGAN's output map, receptive field and initialisation."""

from __future__ import annotations

import pytest
import torch

from genlab.nn.attention import SpatialAttention
from genlab.nn.autoencoder import Decoder, Encoder
from genlab.nn.discriminator import PatchDiscriminator, receptive_field

SMALL = dict(res_blocks=1, latent_channels=3, groups=4)
LEVELS = {4: (8, 16, 16), 8: (8, 8, 16, 16)}  # downsampling factor f → channels per level


def count_attention(module: torch.nn.Module) -> int:
    return sum(isinstance(m, SpatialAttention) for m in module.modules())


@pytest.mark.parametrize("f", [4, 8])
@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("image_channels", [1, 3])
def test_encoder_decoder_shapes(f, size, image_channels):
    enc = Encoder(in_channels=image_channels, channels=LEVELS[f], **SMALL)
    dec = Decoder(out_channels=image_channels, channels=LEVELS[f], **SMALL)
    assert enc.downsample_factor == dec.downsample_factor == f
    x = torch.randn(2, image_channels, size, size)
    z = enc(x)
    assert z.shape == (2, 3, size // f, size // f)
    assert dec(z).shape == x.shape


def test_default_configuration_round_trips_shapes():
    enc, dec = Encoder(), Decoder()
    z = enc(torch.randn(1, 3, 32, 32))
    assert z.shape == (1, 4, 8, 8)
    assert dec(z).shape == (1, 3, 32, 32)


def test_double_latent_doubles_the_channels():
    enc = Encoder(channels=LEVELS[4], double_latent=True, **SMALL)
    assert enc(torch.randn(2, 3, 16, 16)).shape == (2, 6, 4, 4)


def test_last_layer_is_the_final_conv_and_gets_gradients():
    dec = Decoder(channels=LEVELS[4], **SMALL)
    z = torch.randn(2, 3, 4, 4)
    out = dec(z)
    (grad,) = torch.autograd.grad(out.square().mean(), dec.last_layer)
    assert grad.shape == (3, 8, 3, 3) and grad.abs().sum() > 0
    # the output is that conv's: with its weight at zero only its bias is left, at every pixel
    with torch.no_grad():
        dec.last_layer.zero_()
    bias = dec.conv_out[-1].bias
    torch.testing.assert_close(dec(z), bias[None, :, None, None].expand(2, 3, 16, 16))


@pytest.mark.parametrize("mid_attention", [True, False])
def test_attention_goes_where_asked(mid_attention):
    kw = dict(channels=LEVELS[8], attention_levels=(1, 3), mid_attention=mid_attention)
    small = {**SMALL, "res_blocks": 2}
    enc, dec = Encoder(**kw, **small), Decoder(**kw, **small)
    # after every residual block of levels 1 and 3: 2 per encoder level, 3 per decoder level
    assert [count_attention(level) for level in enc.down] == [0, 2, 0, 2]
    assert [count_attention(level) for level in dec.up] == [0, 3, 0, 3]
    assert count_attention(enc.mid) == count_attention(dec.mid) == int(mid_attention)
    z = enc(torch.randn(1, 3, 16, 16))
    assert dec(z).shape == (1, 3, 16, 16)


@pytest.mark.parametrize("net", [Encoder, Decoder])
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(channels=(8, 12), groups=8), "channels"),
        (dict(channels=()), "channels"),
        (dict(channels=(8, 16), groups=8, attention_levels=(2,)), "attention_levels"),
        (dict(channels=(8, 16), groups=8, res_blocks=0), "res_blocks"),
        (dict(channels=(8, 16), groups=8, latent_channels=0), "latent_channels"),
    ],
)
def test_bad_arguments_name_the_argument(net, kwargs, named):
    with pytest.raises(ValueError, match=named):
        net(**kwargs)


@pytest.mark.parametrize(
    ("size", "layers", "logits"), [(32, 3, 2), (64, 3, 6), (256, 3, 30), (32, 2, 6)]
)
def test_discriminator_patch_map_shape(size, layers, logits):
    disc = PatchDiscriminator(in_channels=1, channels=8, layers=layers)
    assert disc(torch.randn(2, 1, size, size)).shape == (2, 1, logits, logits)


@pytest.mark.parametrize("norm", ["group", "none"])
def test_discriminator_other_norms(norm):
    disc = PatchDiscriminator(channels=8, norm=norm, groups=8)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def test_receptive_field_is_pix2pix_and_measured():
    assert [receptive_field(n) for n in (1, 3, 5)] == [16, 70, 286]  # Isola et al. 2017, §4.4
    disc = PatchDiscriminator(channels=8, norm="none")
    assert disc.receptive_field == 70
    x = torch.randn(1, 3, 128, 128, requires_grad=True)
    logits = disc(x)  # (1, 1, 14, 14)
    (grad,) = torch.autograd.grad(logits[0, 0, 7, 7], x)
    rows = grad.abs().sum(dim=(0, 1, 3)).nonzero().flatten()
    cols = grad.abs().sum(dim=(0, 1, 2)).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70


def test_discriminator_initialisation():
    disc = PatchDiscriminator()
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 5 and len(norms) == 3
    for conv in convs[1:-1]:  # ≥ 131k weights each: the sample std is within 1% of 0.02
        assert abs(conv.weight.std().item() - 0.02) < 0.001
        assert abs(conv.weight.mean().item()) < 0.001
        assert conv.bias is None  # batch norm's shift replaces it
    for conv in (convs[0], convs[-1]):
        assert abs(conv.weight.std().item() - 0.02) < 0.004
        assert torch.all(conv.bias == 0)
    weights = torch.cat([n.weight for n in norms])  # 896 scales
    assert abs(weights.mean().item() - 1) < 0.005 and abs(weights.std().item() - 0.02) < 0.004
    assert all(torch.all(n.bias == 0) for n in norms)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(norm="instance"), "norm"),
        (dict(layers=0), "layers"),
        (dict(channels=0), "channels"),
        (dict(channels=8, norm="group"), "groups"),
    ],
)
def test_discriminator_bad_arguments(kwargs, named):
    with pytest.raises(ValueError, match=named):
        PatchDiscriminator(**kwargs)
