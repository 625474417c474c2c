"""LPIPS: parity with the `lpips` package, gradients, frozen eval mode, NaN-freedom, loading."""

import re
import warnings

import pytest
import torch
from torch import nn

import hetvae.perceptual as perceptual
from hetvae.perceptual import LPIPS, normalize_channels

lpips = pytest.importorskip("lpips")

SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)  # lpips ScalingLayer


@pytest.fixture(scope="module")
def reference():
    """lpips v0.1 VGG with a random trunk (nothing downloaded) and non-zero random biases."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of `pretrained=`
        ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    with torch.no_grad():
        for name, param in ref.net.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return ref.eval()


@pytest.fixture(scope="module")
def vgg_state(reference):
    """The reference trunk as a torchvision-named VGG16 state dict (features.{i}.weight ...)."""
    state = {}
    for key, value in reference.net.state_dict().items():
        _, index, kind = key.split(".")  # "slice{k}.{i}.{weight|bias}"
        state[f"features.{index}.{kind}"] = value.clone()
    return state


@pytest.fixture(scope="module")
def vgg_file(vgg_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(vgg_state, path)
    return path


@pytest.fixture(scope="module")
def model(vgg_file):
    return LPIPS(vgg_path=vgg_file)  # calibration found inside the lpips package


def images(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) * 2 - 1


@pytest.mark.parametrize("size", [(64, 64), (48, 40)])
def test_parity_with_lpips_package(model, reference, size):
    x, y = images(2, 3, *size, seed=1), images(2, 3, *size, seed=2)
    with torch.no_grad():
        ours, ours_map = model(x, y), model(x, y, spatial=True)
        reference.spatial = False
        ref = reference(x, y)
        reference.spatial = True
        ref_map = reference(x, y)
        reference.spatial = False
    assert ours.shape == (2, 1, 1, 1) and ours_map.shape == (2, 1, *size)
    assert ref.abs().min() > 1e-3  # the comparison is not between two zeros
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_map, ref_map, atol=1e-5, rtol=0)


@pytest.mark.parametrize("needs", [(True, False), (False, True), (True, True)])
def test_gradients_match_lpips_package_whichever_image_needs_them(model, reference, needs):
    # one image needing gradients runs the trunk twice (backward through one); both: one batch of two
    x, y = images(2, 3, 32, 32, seed=3), images(2, 3, 32, 32, seed=4)
    grads = []
    for fn in (model, reference):
        a, b = x.clone().requires_grad_(needs[0]), y.clone().requires_grad_(needs[1])
        value = fn(a, b)
        value.sum().backward()
        grads.append((value.detach(), a.grad, b.grad))
    (ours, ga, gb), (ref, ra, rb) = grads
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    for got, want, need in ((ga, ra, needs[0]), (gb, rb, needs[1])):
        assert (got is not None) == need
        if need:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_calibration_found_in_lpips_package(model, reference):
    for ours, ref in zip(model.lins, reference.lins):
        torch.testing.assert_close(ours.weight, ref.model[-1].weight, atol=0, rtol=0)


def test_normalize_matches_lpips_and_is_nan_free_at_zero():
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(normalize_channels(x), lpips.normalize_tensor(x), atol=1e-6, rtol=0)
    x[:, :, 2, 3] = 0.0  # one location with all channels zero
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    (normalize_channels(ours) * torch.randn_like(x)).sum().backward()
    (lpips.normalize_tensor(ref) * torch.randn_like(x)).sum().backward()
    assert torch.isfinite(ours.grad).all()
    assert torch.isnan(ref.grad).any()  # the reference's known failure that we avoid


def test_gradient_reaches_input_not_parameters(model):
    x = images(2, 3, 32, 32, seed=3).requires_grad_()
    y = images(2, 3, 32, 32, seed=4)
    model(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_stays_in_eval_mode_inside_a_training_parent(model):
    parent = nn.ModuleDict({"lpips": model, "head": nn.Dropout()})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("fill", [None, 0.0, 1.0, -1.0])
def test_no_nan_identical_and_constant_images(model, fill):
    x = images(2, 3, 32, 32, seed=5) if fill is None else torch.full((2, 3, 32, 32), fill)
    targets = (x.clone(), torch.zeros_like(x), torch.full_like(x, 0.5))
    for target, spatial in zip(targets, (False, True, False)):
        inp = x.clone().requires_grad_()
        d = model(inp, target, spatial=spatial)
        (grad,) = torch.autograd.grad(d.sum(), inp)
        assert torch.isfinite(d).all() and torch.isfinite(grad).all()
    with torch.no_grad():
        assert model(x, x).abs().max() < 1e-6


def test_no_nan_when_features_are_all_zero():
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        model = LPIPS(weights="random")  # zero conv biases
    x = SHIFT.expand(2, 3, 32, 32).clone().requires_grad_()  # scaled input is exactly 0
    taps = []
    model.features[3].register_forward_hook(lambda m, i, o: taps.append(o.detach().clone()))
    for target in (SHIFT.expand(2, 3, 32, 32), images(2, 3, 32, 32, seed=6)):
        d = model(x, target)
        (grad,) = torch.autograd.grad(d.sum(), x)
        assert torch.isfinite(d).all() and torch.isfinite(grad).all()
    assert taps[0][:2].abs().max() == 0  # relu1_2 of the input really is all zero


def test_no_nan_for_tiny_features_under_float16_autocast():
    # SD VAE's NaN: in float16, sum_c f^2 of tiny features underflows to 0 and lpips's
    # f / (0 + 1e-10) is f / 0; we normalise in float32
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        model = LPIPS(weights="random")
    x = (SHIFT + 1e-5 * torch.randn(2, 3, 32, 32)).requires_grad_()
    taps = []
    model.features[3].register_forward_hook(lambda m, i, o: taps.append(o.detach().clone()))
    with torch.autocast("cpu", dtype=torch.float16):
        d = model(x, images(2, 3, 32, 32, seed=9))
    (grad,) = torch.autograd.grad(d.sum(), x)
    assert taps[0].dtype == torch.float16 and taps[0][:2].abs().max() < 1e-3
    assert d.dtype == torch.float32
    assert torch.isfinite(d).all() and torch.isfinite(grad).all()


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="tests and smoke runs only"):
        LPIPS(weights="random")


def test_missing_vgg_names_file_and_remedy(monkeypatch):
    def offline():
        raise OSError("no connection")

    monkeypatch.setattr(perceptual, "_timm_pretrained_vgg16", offline)
    with pytest.raises(FileNotFoundError, match=r"vgg16\.tv_in1k") as info:
        LPIPS()
    assert "vgg_path=" in str(info.value) and "vgg16-397923af.pth" in str(info.value)


def test_missing_vgg_path_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path)) + ".*vgg_path="):
        LPIPS(vgg_path=path)


def test_missing_calibration_names_file_and_remedy(monkeypatch, vgg_file):
    monkeypatch.setattr(perceptual, "_lpips_package_calibration", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"pip install lpips.*calibration_path="):
        LPIPS(vgg_path=vgg_file)


def test_unknown_weights_mode():
    with pytest.raises(ValueError, match="'auto', 'random'"):
        LPIPS(weights="imagenet")


def test_loads_timm_and_torchvision_naming_and_safetensors(model, vgg_state, tmp_path):
    from safetensors.torch import save_file

    x, y = images(2, 3, 32, 32, seed=7), images(2, 3, 32, 32, seed=8)
    with torch.no_grad():
        expected = model(x, y)
    # classifier keys are ignored, whatever their shape
    a, b = torch.zeros(2), torch.ones(3)
    timm_named = {**vgg_state, "pre_logits.fc1.weight": a, "head.fc.bias": b}
    torchvision_named = {**vgg_state, "classifier.0.weight": a, "classifier.6.bias": b}
    torch.save(timm_named, tmp_path / "timm.pth")
    save_file(torchvision_named, str(tmp_path / "tv.safetensors"))
    for path in (tmp_path / "timm.pth", tmp_path / "tv.safetensors"):
        with torch.no_grad():
            torch.testing.assert_close(LPIPS(vgg_path=path)(x, y), expected, atol=0, rtol=0)


def test_wrong_vgg_file_lists_keys(vgg_state, tmp_path):
    state = dict(vgg_state)
    del state["features.28.bias"]
    state["features.1.running_mean"] = torch.zeros(64)
    torch.save(state, tmp_path / "bn.pth")
    with pytest.raises(ValueError, match=r"missing keys \['features\.28\.bias'\].*running_mean"):
        LPIPS(vgg_path=tmp_path / "bn.pth")
