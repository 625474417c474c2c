"""LPIPS perceptual distance on a timm VGG16 trunk.

LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", https://arxiv.org/abs/1801.03924), version 0.1 with the VGG16 trunk, as used by the
Stable Diffusion VAE objective. For images ``x, y`` in ``[-1, 1]``::

    s(x)      = (x - shift) / scale                      # LPIPS's ScalingLayer, per RGB channel
    f_l       = VGG16 features of s(x) at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    f^_l      = f_l / ||f_l||_2                          # unit norm over channels, per location
    m_l(h, w) = sum_c w_{l,c} (f^_l(x) - f^_l(y))^2_{c,h,w}   # w_l >= 0: the v0.1 calibration
    d(x, y)   = sum_l mean_{h,w} m_l                     # spatial=False: (B, 1, 1, 1)
    D(x, y)   = sum_l upsample(m_l)                      # spatial=True:  (B, 1, H, W)

``upsample`` is bilinear with ``align_corners=False`` to the input size, as in the ``lpips``
package. The trunk and calibration are frozen and always in eval mode; the distance is
differentiable with respect to both images.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from hetvae.layers import activation_layout
from hetvae.pickles import load_weights_only

__all__ = ["LPIPS", "normalize_channels"]

# Indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in VGG16's `features` Sequential;
# torchvision and timm number it identically.
_TAPS = (3, 8, 15, 22, 29)
_CHANNELS = (64, 128, 256, 512, 512)
_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG_KEYS = frozenset(f"features.{i}.{p}" for i in _CONV_INDICES for p in ("weight", "bias"))
# classifier weights of torchvision (`classifier.*`) and timm (`pre_logits.*`, `head.*`) files
_VGG_IGNORED_PREFIXES = ("classifier.", "pre_logits.", "head.")

# LPIPS's ScalingLayer: shift/scale of [-1, 1] inputs onto ImageNet-normalised ones.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

_TIMM_PRETRAINED = "vgg16.tv_in1k"
_CALIBRATION_IN_LPIPS = "lpips/weights/v0.1/vgg.pth"
_WEIGHTS = ("auto", "random")

_HOW_TO_SUPPLY_VGG = (
    "Supply ImageNet VGG16 weights as a local file with LPIPS(vgg_path=...): torchvision's "
    "'vgg16-397923af.pth' or timm's 'vgg16.tv_in1k' state dict (.pth/.bin/.safetensors; only the "
    "`features.*` keys are used), or run once online so that timm caches "
    f"'{_TIMM_PRETRAINED}' (Hugging Face hub file timm/{_TIMM_PRETRAINED}/model.safetensors)."
)
_HOW_TO_SUPPLY_CALIBRATION = (
    "Supply the LPIPS v0.1 calibration weights with `pip install lpips` (it ships them as "
    f"{_CALIBRATION_IN_LPIPS}) or LPIPS(calibration_path='.../vgg.pth')."
)


def normalize_channels(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalise ``x`` (B, C, H, W) over channels: ``x / sqrt(sum_c x_c^2 + eps^2)``.

    The ``lpips`` package computes ``x / (sqrt(sum_c x_c^2) + eps)``: equal to this within
    ``~eps / ||x||`` relative, but its gradient is NaN wherever all channels are zero (the
    backward of ``sqrt`` at 0 is ``inf * 0``), a known source of NaN when fine-tuning the SD VAE.
    ``rsqrt(s + eps^2)`` is smooth at ``s = 0``, so value and gradient stay finite.
    Returns a tensor of the shape of ``x``.
    """
    return x * torch.rsqrt(x.square().sum(dim=1, keepdim=True) + eps * eps)


def _vgg16_features() -> nn.Sequential:
    """VGG16 ``features[:30]`` (conv1_1 .. relu5_3) built by timm, parameters uninitialised."""
    import timm

    # on the meta device: the 100M-parameter classifier is never allocated
    with torch.device("meta"):
        model = timm.create_model("vgg16", pretrained=False)
    return model.features[: _TAPS[-1] + 1].to_empty(device="cpu")


def _load_file(path: str | Path, what: str) -> dict[str, Tensor]:
    """Load a flat state dict: safetensors, else ``torch.load(weights_only=True)``."""
    path = Path(path).expanduser()
    if not path.is_file():
        how = _HOW_TO_SUPPLY_VGG if what == "VGG16" else _HOW_TO_SUPPLY_CALIBRATION
        raise FileNotFoundError(f"LPIPS {what} weights file not found: {path}. {how}")
    if path.suffix == ".safetensors":
        state = load_file(str(path), device="cpu")
    else:
        try:
            state = load_weights_only(path)
        except ValueError as e:  # refused as code, or damaged
            raise ValueError(f"LPIPS {what} weights file {path}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"LPIPS {what} weights file {path} does not hold a flat state dict")
    return state


def _select_vgg_keys(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Keep VGG16's conv weights from a torchvision- or timm-named state dict."""
    features = {k: v for k, v in state.items() if not k.startswith(_VGG_IGNORED_PREFIXES)}
    missing = sorted(_VGG_KEYS - features.keys())
    unexpected = sorted(features.keys() - _VGG_KEYS)
    if missing or unexpected:
        raise ValueError(
            f"{source} is not a VGG16 state dict in torchvision/timm naming "
            f"(features.0.weight, ...; a batch-norm VGG16 does not fit): "
            f"missing keys {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected keys {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
        )
    return features


def _select_calibration_keys(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Map ``lin{l}.model.{i}.weight`` (lpips package) or ``lins.{l}.weight`` onto the latter."""
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"lin(\d)\.model\.\d+\.weight|lins\.(\d)\.weight", key)
        if match is None:
            raise ValueError(f"{source}: unexpected key {key!r} in LPIPS calibration weights")
        out[f"lins.{match.group(1) or match.group(2)}.weight"] = value
    missing = sorted({f"lins.{i}.weight" for i in range(len(_CHANNELS))} - out.keys())
    if missing:
        raise ValueError(f"{source}: LPIPS calibration weights lack {missing}")
    return out


def _lpips_package_calibration() -> Path | None:
    """``lpips/weights/v0.1/vgg.pth`` inside the installed lpips package, without importing it."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "weights" / "v0.1" / "vgg.pth"
        if path.is_file():
            return path
    return None


def _timm_pretrained_vgg16() -> dict[str, Tensor]:
    """timm's pretrained VGG16 ``features`` (from its cache, or downloaded when online)."""
    import timm

    model = timm.create_model(_TIMM_PRETRAINED, pretrained=True)
    return {f"features.{k}": v for k, v in model.features.state_dict().items()}


class LPIPS(nn.Module):
    """LPIPS v0.1 distance with a VGG16 trunk (Zhang et al. 2018); math in the module docstring.

    Args:
        weights: ``"auto"``: the trunk from ``vgg_path`` if given, else timm's pretrained
            ``'vgg16.tv_in1k'`` (cache or download); the calibration from ``calibration_path`` if
            given, else the copy shipped inside the ``lpips`` package. Anything missing is a
            ``FileNotFoundError`` naming the file and how to supply it.
            ``"random"``: a randomly initialised trunk (timm's VGG init) and uniform calibration
            ``w_{l,c} = 1 / C_l``; meaningless as a perceptual loss, for tests and smoke runs only,
            and warns.
        vgg_path: VGG16 state dict in torchvision or timm naming (``features.0.weight``, ...;
            classifier keys are ignored), ``.safetensors`` or a pickle read with ``weights_only``.
        calibration_path: the LPIPS v0.1 VGG calibration (``lin0.model.1.weight`` ... as in
            ``lpips/weights/v0.1/vgg.pth``).

    State dict: ``features.{i}.weight|bias`` (VGG16 ``features`` indices) and ``lins.{l}.weight``
    of shape (1, C_l, 1, 1).
    """

    def __init__(
        self,
        *,
        weights: str = "auto",
        vgg_path: str | Path | None = None,
        calibration_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        if weights not in _WEIGHTS:
            raise ValueError(f"unknown LPIPS weights {weights!r}; valid: {list(_WEIGHTS)}")
        if weights == "random" and (vgg_path is not None or calibration_path is not None):
            raise ValueError("LPIPS(weights='random') takes no vgg_path or calibration_path")

        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)

        if weights == "random":
            warnings.warn(
                "LPIPS(weights='random'): random VGG16 trunk and uniform calibration. This is NOT "
                "a perceptual loss; use it for tests and smoke runs only.",
                UserWarning,
                stacklevel=2,
            )
            self._init_random()
        else:
            self._load_weights(vgg_path, calibration_path)

        self.requires_grad_(False)
        self.eval()

    def _init_random(self) -> None:
        for module in self.features:
            if isinstance(module, nn.Conv2d):  # timm's and torchvision's VGG init
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            for lin in self.lins:
                lin.weight.fill_(1.0 / lin.in_channels)

    def _load_weights(
        self, vgg_path: str | Path | None, calibration_path: str | Path | None
    ) -> None:
        if vgg_path is not None:
            vgg = _select_vgg_keys(_load_file(vgg_path, "VGG16"), f"VGG16 weights file {vgg_path}")
        else:
            try:
                state = _timm_pretrained_vgg16()
            except Exception as error:  # offline, no cache, hub errors: all mean "no file"
                reason = (str(error).splitlines() or [""])[0]
                raise FileNotFoundError(
                    "LPIPS needs ImageNet VGG16 weights: vgg_path was not given and timm could "
                    f"not load its pretrained '{_TIMM_PRETRAINED}' "
                    f"({type(error).__name__}: {reason}). "
                    + _HOW_TO_SUPPLY_VGG
                ) from error
            vgg = _select_vgg_keys(state, f"timm '{_TIMM_PRETRAINED}'")

        if calibration_path is None:
            calibration_path = _lpips_package_calibration()
            if calibration_path is None:
                raise FileNotFoundError(
                    "LPIPS v0.1 calibration weights (vgg.pth) not found: calibration_path was not "
                    "given and the `lpips` package is not installed. " + _HOW_TO_SUPPLY_CALIBRATION
                )
        lins = _select_calibration_keys(
            _load_file(calibration_path, "calibration"), f"calibration file {calibration_path}"
        )
        self.features.load_state_dict({k.removeprefix("features."): v for k, v in vgg.items()})
        self.lins.load_state_dict({k.removeprefix("lins."): v for k, v in lins.items()})

    def train(self, mode: bool = True) -> LPIPS:
        """No-op: a frozen metric stays in eval mode whatever its parent module does."""
        return super().train(False)

    def _taps(self, x: Tensor, *, grad: bool) -> list[Tensor]:
        """VGG16 features of ``x`` at relu1_2 ... relu5_3 (gradients recorded if ``grad``)."""
        taps = []
        with torch.set_grad_enabled(grad):
            h = activation_layout((x - self.shift) / self.scale)
            for index, layer in enumerate(self.features):
                h = layer(h)
                if index in _TAPS:
                    taps.append(h)
        return taps

    def forward(self, input: Tensor, target: Tensor, *, spatial: bool = False) -> Tensor:
        """LPIPS distance between ``input`` and ``target``, both (B, 3, H, W) in ``[-1, 1]``.

        Returns float32 (B, 1, 1, 1), or the per-pixel map (B, 1, H, W) when ``spatial``
        (whose spatial mean is close to, not equal to, the scalar: the maps are upsampled).
        """
        if input.shape != target.shape or input.ndim != 4 or input.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two (B, 3, H, W) images of one shape, got "
                f"{tuple(input.shape)} and {tuple(target.shape)}"
            )
        grad = torch.is_grad_enabled()
        if grad and input.requires_grad != target.requires_grad:
            # Typically a reconstruction against fixed images: the trunk's backward then runs on
            # the reconstruction only (one batch instead of two).
            pairs = zip(self._taps(input, grad=input.requires_grad), self._taps(target, grad=target.requires_grad))
        else:
            batch = input.shape[0]
            pairs = [(h[:batch], h[batch:]) for h in self._taps(torch.cat([input, target]), grad=grad)]
        out = None
        for lin, (h_input, h_target) in zip(self.lins, pairs):
            # normalisation and calibration in float32 whatever the autocast dtype
            with torch.autocast(device_type=h_input.device.type, enabled=False):
                diff = (normalize_channels(h_input.float()) - normalize_channels(h_target.float())).square()
                m = F.conv2d(diff, lin.weight.float())
                if spatial:
                    m = F.interpolate(
                        m, size=input.shape[-2:], mode="bilinear", align_corners=False
                    )
                else:
                    m = m.mean(dim=(2, 3), keepdim=True)
            out = m if out is None else out + m
        return out
