"""LPIPS (Zhang et al. 2018, v0.1, VGG16): the functional VGG16 against torchvision's, weights
found in the torch hub cache and the lpips package or missing (error, fallback), the distance
against a hand-written loop and against the lpips package's own code, its properties (zero on
itself, symmetric, monotone in noise), frozen buffers outside the state dict, dtypes and autocast.

A fake ``vgg16-397923af.pth`` (torchvision's VGG16 at random init) stands in for the ImageNet
weights, which are not on this machine."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision

from genlab.nn.lpips import (
    CHANNELS,
    LPIPS,
    VGG16_CONVS,
    VGG16_FILE,
    VGG16_URL,
    VGG16Features,
    linear_file,
    load_linear,
    load_vgg16,
    random_vgg16,
)

LIN_FILE = linear_file()
needs_lpips = pytest.mark.skipif(
    LIN_FILE is None or not LIN_FILE.is_file(),
    reason="the lpips package (lpips==0.1.4 in requirements.lock) is not installed, so the "
    "v0.1 linear weights are not on this machine",
)
TAPS = (3, 8, 15, 22, 29)  # relu1_2 … relu5_3 in torchvision's vgg16().features


def images(n: int, size: int = 32, *, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """Smooth random images in [-1, 1]: uniform noise at 1/4 resolution, upsampled."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, size // 4, size // 4, generator=g) * 2 - 1
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False)


def noisy(x: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def torchvision_features() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).features.eval()


@pytest.fixture(scope="module")
def fake_vgg_file(tmp_path_factory, torchvision_features):
    """torchvision's randomly initialised VGG16 features saved as ``vgg16-397923af.pth``, with a
    stand-in classifier key that the loader must ignore."""
    state = {f"features.{k}": v for k, v in torchvision_features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 2)
    path = tmp_path_factory.mktemp("vgg") / VGG16_FILE
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def offline() -> LPIPS:
    return LPIPS(weights="offline")


@pytest.fixture(scope="module")
def pretrained(fake_vgg_file) -> LPIPS:
    if LIN_FILE is None or not LIN_FILE.is_file():
        pytest.skip("the lpips package is not installed: no v0.1 linear weights")
    return LPIPS(weights="pretrained", vgg_path=str(fake_vgg_file))


def hub_with(tmp_path, monkeypatch, vgg_file=None):
    """Point TORCH_HOME at an empty folder, with ``vgg_file`` in its hub cache if given."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    if vgg_file is not None:
        (checkpoints / VGG16_FILE).symlink_to(vgg_file)
    return checkpoints / VGG16_FILE


# ----------------------------------------------------------------------------------------------
# The VGG16 stack and the weights files


def test_vgg_stack_matches_torchvision_taps(fake_vgg_file, torchvision_features):
    convs = [i for i, m in enumerate(torchvision_features) if isinstance(m, torch.nn.Conv2d)]
    assert [c.index for c in VGG16_CONVS] == convs
    vgg = VGG16Features(load_vgg16(fake_vgg_file))
    x = torch.randn(2, 3, 32, 32)
    expected, h = [], x
    for i, layer in enumerate(torchvision_features[: TAPS[-1] + 1]):
        h = layer(h)
        if i in TAPS:
            expected.append(h.clone())
    with torch.no_grad():
        taps = vgg(x)
    assert [t.shape[1:] for t in taps] == [(c, 32 >> k, 32 >> k) for k, c in enumerate(CHANNELS)]
    for tap, reference in zip(taps, expected, strict=True):
        assert torch.equal(tap, reference)


def test_vgg_state_dict_is_checked():
    state = random_vgg16()
    state["features.7.weight"] = torch.zeros(128, 64, 5, 5)
    with pytest.raises(ValueError, match=r"features\.7\.weight has shape \(128, 64, 5, 5\)"):
        VGG16Features(state, source="my.pth")
    del state["features.7.weight"]
    with pytest.raises(ValueError, match=r"my\.pth: no key 'features\.7\.weight'"):
        VGG16Features(state, source="my.pth")


@needs_lpips
def test_package_linear_weights_are_nonnegative_with_lpips_shapes():
    weights = load_linear(LIN_FILE)
    assert [tuple(w.shape) for w in weights] == [(c,) for c in CHANNELS]
    assert all((w >= 0).all() and w.std() > 0 for w in weights)  # calibrated, not uniform


def test_linear_file_is_checked(tmp_path):
    path = tmp_path / "vgg.pth"
    bad = {f"lin{k}.model.1.weight": torch.ones(1, c, 1, 1) for k, c in enumerate(CHANNELS)}
    bad["lin2.model.1.weight"] = torch.ones(1, 128, 1, 1)
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"lin2\.model\.1\.weight is shaped \(1, 128, 1, 1\)"):
        load_linear(path)
    bad["lin2.model.1.weight"] = -torch.ones(1, 256, 1, 1)
    torch.save(bad, path)
    with pytest.raises(ValueError, match="negative"):
        load_linear(path)


@needs_lpips
def test_pretrained_from_the_hub_cache_and_the_lpips_package(tmp_path, monkeypatch, fake_vgg_file):
    vgg = hub_with(tmp_path, monkeypatch, fake_vgg_file)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found: no fallback warning
        lpips = LPIPS()  # auto
    assert lpips.kind == "pretrained" and lpips.files == (vgg, LIN_FILE)
    line = lpips.describe()
    assert line.startswith("LPIPS v0.1") and str(vgg) in line and str(LIN_FILE) in line
    assert "sha256" in line and "\n" not in line
    assert LPIPS(weights="pretrained").kind == "pretrained"


def test_pretrained_names_every_missing_path(tmp_path, monkeypatch):
    vgg = hub_with(tmp_path, monkeypatch)
    lin = tmp_path / "nowhere" / "vgg.pth"
    with pytest.raises(FileNotFoundError) as error:
        LPIPS(weights="pretrained", lin_path=str(lin))
    message = str(error.value)
    assert str(vgg) in message and str(lin) in message and VGG16_URL in message
    assert "vgg_path" in message and "lin_path" in message
    custom = tmp_path / "my_vgg.pth"
    with pytest.raises(FileNotFoundError, match=str(custom)):
        LPIPS(weights="pretrained", vgg_path=str(custom), lin_path=str(lin))


def test_auto_falls_back_to_offline_with_a_warning(tmp_path, monkeypatch):
    vgg = hub_with(tmp_path, monkeypatch)
    with pytest.warns(UserWarning, match="offline") as record:
        lpips = LPIPS(weights="auto")
    assert str(vgg) in str(record[0].message)
    assert lpips.kind == "offline" and str(vgg) in lpips.describe()
    assert lpips.describe().startswith("offline: random-feature VGG16 distance (seed 0")


def test_bad_arguments_and_inputs(offline):
    with pytest.raises(ValueError, match=r"weights='imagenet' is not one of"):
        LPIPS(weights="imagenet")
    x = images(2)
    for y in (images(2, 16), torch.zeros(2, 2, 32, 32), torch.zeros(3, 3, 32, 32)):
        with pytest.raises(ValueError, match="same shape"):
            offline(x, y)
    with pytest.raises(ValueError, match="H, W >= 16"):
        offline(images(2, 8), images(2, 8))


# ----------------------------------------------------------------------------------------------
# The distance


def reference_lpips(lpips: LPIPS, features: torch.nn.Sequential, x, y) -> torch.Tensor:
    """Eq. 1 written out: the scaling layer, torchvision's taps, and at every tap and position
    the unit-normalised feature vectors, their weighted squared difference, averaged over
    positions and summed over taps."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=x.dtype).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=x.dtype).view(1, 3, 1, 1)
    d = torch.zeros(len(x), dtype=x.dtype)
    for b in range(len(x)):
        taps = []
        for image in (x[b : b + 1], y[b : b + 1]):
            h, out = (image - shift) / scale, []
            for i, layer in enumerate(features[: TAPS[-1] + 1]):
                h = layer(h)
                if i in TAPS:
                    out.append(h[0].clone())
            taps.append(out)
        for k, (fx, fy) in enumerate(zip(*taps, strict=True)):
            v, (_, rows, cols) = getattr(lpips, f"lin{k}"), fx.shape
            for r in range(rows):
                for c in range(cols):
                    ux = fx[:, r, c] / (fx[:, r, c].pow(2).sum().sqrt() + 1e-10)
                    uy = fy[:, r, c] / (fy[:, r, c].pow(2).sum().sqrt() + 1e-10)
                    d[b] += (v * (ux - uy) ** 2).sum() / (rows * cols)
    return d


def test_forward_equals_the_formula_written_out(tmp_path, fake_vgg_file, torchvision_features):
    g = torch.Generator().manual_seed(0)
    lin = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
        for k, c in enumerate(CHANNELS)
    }
    torch.save(lin, tmp_path / "lin.pth")
    lpips = LPIPS(
        weights="pretrained", vgg_path=str(fake_vgg_file), lin_path=str(tmp_path / "lin.pth")
    )
    lpips = lpips.double()
    x, y = images(2, 16).double(), images(2, 16, seed=5).double()
    with torch.no_grad():
        expected = reference_lpips(lpips, copy.deepcopy(torchvision_features).double(), x, y)
        # float64 throughout; the module's shift and scale are float32 constants (~1e-8 apart)
        torch.testing.assert_close(lpips(x, y), expected, rtol=1e-7, atol=0)


def test_matches_the_lpips_package(pretrained, fake_vgg_file):
    """The lpips package's own ``LPIPS(net="vgg")`` (v0.1 weights, its VGG replaced by the fake
    file's) gives the same distances: the scaling layer, taps, eps and weights all agree."""
    lpips_package = pytest.importorskip("lpips")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of pretrained=
        reference = lpips_package.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    state = load_vgg16(fake_vgg_file)
    for name, p in reference.net.named_parameters():  # slice{k}.{torchvision index}.{kind}
        _, index, kind = name.split(".")
        p.data.copy_(state[f"features.{index}.{kind}"])
    x, y = images(3), noisy(images(3), 0.2)
    with torch.no_grad():
        torch.testing.assert_close(pretrained(x, y), reference(x, y).flatten())


@pytest.mark.parametrize("kind", ["offline", "pretrained"])
def test_distance_properties(kind, request):
    lpips = request.getfixturevalue(kind)
    x, y = images(4), images(4, seed=7)
    with torch.no_grad():
        assert torch.equal(lpips(x, x), torch.zeros(4))
        torch.testing.assert_close(lpips(x, y), lpips(y, x))
        assert (lpips(x, y) > 0).all()
        light, heavy = lpips(x, noisy(x, 0.05)), lpips(x, noisy(x, 0.5))
    assert (light > 0).all() and (heavy > 2 * light).all()


def test_grayscale_is_read_as_rgb(offline):
    g, h = images(2, channels=1), images(2, seed=3, channels=1)
    with torch.no_grad():
        rgb = offline(g.expand(-1, 3, -1, -1), h.expand(-1, 3, -1, -1))
        torch.testing.assert_close(offline(g, h), rgb)


def test_frozen_buffers_outside_the_state_dict_gradients_to_the_input(offline):
    assert list(offline.parameters()) == [] and offline.state_dict() == {}
    assert len(list(offline.buffers())) == 2 * 13 + 5 + 2
    x_hat = noisy(images(2), 0.1).requires_grad_()
    offline(x_hat, images(2)).sum().backward()
    assert torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
    assert all(b.grad is None for b in offline.buffers())


def test_train_mode_changes_nothing(offline):
    x, y = images(2), images(2, seed=3)
    with torch.no_grad():
        d_eval = offline.eval()(x, y)
        d_train = offline.train()(x, y)
    offline.eval()
    assert torch.equal(d_eval, d_train)


def test_offline_weights_are_deterministic(offline):
    again = LPIPS(weights="offline")
    for (name, a), (_, b) in zip(offline.named_buffers(), again.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(random_vgg16(1)["features.0.weight"], offline.vgg.conv1_1_weight)
    assert all(
        torch.equal(getattr(offline, f"lin{k}"), torch.ones(c)) for k, c in enumerate(CHANNELS)
    )


def test_to_dtype_moves_the_buffers():
    lpips = LPIPS(weights="offline")
    x, y = images(2), images(2, seed=3)
    with torch.no_grad():
        d32 = lpips(x, y)
        lpips.to(torch.float64)
        assert all(b.dtype == torch.float64 for b in lpips.buffers())
        d64 = lpips(x, y)  # float32 inputs are cast to the buffers' dtype
    assert d64.dtype == torch.float64
    torch.testing.assert_close(d64.float(), d32, rtol=1e-4, atol=1e-6)


def test_runs_under_bf16_autocast(offline):
    x, y = images(2), noisy(images(2), 0.2)
    x_hat = y.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = offline(x_hat, x)
        d_bf16_input = offline(x_hat.bfloat16(), x.bfloat16())
    d.sum().backward()
    assert d.shape == (2,) and torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(d.float(), offline(y, x), rtol=0.05, atol=0)
        torch.testing.assert_close(d_bf16_input.float(), offline(y, x), rtol=0.05, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moves_to_the_gpu(offline):
    lpips = LPIPS(weights="offline").cuda()
    assert all(b.is_cuda for b in lpips.buffers())
    x, y = images(2), images(2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            lpips(x.cuda(), y.cuda()).cpu(), offline(x, y), rtol=1e-3, atol=1e-5
        )
