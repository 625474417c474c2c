"""Properties of three surfaces a user reaches from Python, each against an independent reference:

(a) ``--set`` overrides (:func:`hetvae.schema.apply_overrides`) of every form (``section.key=value``,
    ``section={mapping}``, ``section.key={mapping}``, lists), in sequence, against a small merge of
    plain dicts written here: a mapping merges key by key, anything else (lists too) replaces, a
    text field keeps the typed text, a section is never null; then the one schema check.
(b) image tensors of every dtype and range through the Python API (``Predictor.predict``,
    ``evaluate``, ``calibrate``, ``fit_calibration``): refused with a message naming the conversion,
    or scored as the command line scores the same photographs (``load_images``). 0..1 floats lie
    inside [-1, 1] and cannot be told from a dark photograph: they are scored, not refused.
(c) saving a model into one folder several times (formats, serialisations, variants, dtypes, with
    and without a log-scale head, in any order): each save is written or refused leaving the folder
    as it was, and ``AutoencoderKL.from_pretrained`` reads back the weights last written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import tempfile
import typing

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
from hetvae.calibration import fit_calibration
from hetvae.cli import main
from hetvae.config import Config, load_config
from hetvae.convert import save_autoencoder
from hetvae.evaluate import evaluate
from hetvae.images import load_images, read_image
from hetvae.predictor import calibrate, load_predictor
from hetvae.schema import ConfigError, apply_overrides, config_to_dict, from_dict


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run in milliseconds on one thread; on two threads of a loaded 2-core machine
    torch's thread hand-offs cost a second per forward pass."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- (a) --set overrides against a reference merge ------------------------------------------------

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
STARTS = {"default": Config(), "tiny": load_config(CONFIGS / "tiny.yaml")}
SECTIONS = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
SECTIONS = {name: tp for name, tp in SECTIONS.items() if dataclasses.is_dataclass(tp)}
LEAVES = {f"{s}.{k}": tp for s, cls in SECTIONS.items() for k, tp in typing.get_type_hints(cls).items()}
LEAVES["out_dir"] = str
TEXT_ONLY = {key for key, tp in LEAVES.items()  # fields whose annotation takes text and no other scalar
             if tp is str or set(typing.get_args(tp)) - {type(None), list[str]} == {str}}


def _known_values() -> dict[str, list]:
    """Per dotted key, the values the shipped configs give it."""
    table: dict[str, list] = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        for section, values in config_to_dict(cfg).items():
            pairs = values.items() if isinstance(values, dict) else [("", values)]
            for key, value in pairs:
                entry = table.setdefault(f"{section}.{key}" if key else section, [])
                if value not in entry:
                    entry.append(value)
    return table


KNOWN = _known_values()


def flow(value) -> str:
    """``value`` as the YAML a user types after ``=``."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def reference_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = reference_merge(out[key], value)
        else:
            out[key] = value
    return out


def reference_apply(cfg: Config, overrides: list[tuple[str, object]]):
    """``("ok", config)`` or ``("error", dotted key)``: what the docs say ``--set`` does."""
    tree = json.loads(json.dumps(config_to_dict(cfg)))
    for key, value in overrides:
        section, _, leaf = key.partition(".")
        if "." in leaf:  # section.key.more: a value has no keys
            return "error", key.rpartition(".")[0]
        if key not in LEAVES and key not in SECTIONS:
            return "error", key
        if key in SECTIONS and value is None:
            return "error", key
        if key in TEXT_ONLY and not isinstance(value, (str, list, dict, type(None))):
            value = flow(value)  # a text field keeps what was typed: out_dir=yes is "yes"
        if leaf:
            tree[section] = reference_merge(tree[section], {leaf: value})
        else:
            tree = reference_merge(tree, {section: value})
    try:
        return "ok", from_dict(Config, tree)
    except ConfigError as error:
        return "error", error.key


def outcome(call):
    try:
        return "ok", call()
    except ConfigError as error:
        return "error", error.key


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.floats(-10, 10, allow_nan=False, width=32),
    st.sampled_from(["pixel", "cosine", "auto", "yes", "off", "1e-5", "a b", "2024-01-01"]),
    st.lists(st.integers(1, 64), max_size=4), st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=2, max_size=2),
    st.dictionaries(st.sampled_from(["a", "steps", "lr", "0"]), st.integers(0, 9), max_size=2),
)


@st.composite
def override(draw):
    """One ``(dotted key, value)``: mostly values that pass, some that do not."""
    form = draw(st.sampled_from(["leaf", "leaf", "section", "leaf-mapping", "bogus"]))
    if form == "bogus":
        return draw(st.sampled_from(["train.stepz", "train.lr.x", "nosuch", "model.block_out_channels.0"])), 1
    if form == "section":
        section = draw(st.sampled_from(sorted(SECTIONS)))
        keys = draw(st.lists(st.sampled_from(sorted(k for k in LEAVES if k.startswith(section + "."))),
                             max_size=4, unique=True))
        mapping = {k.partition(".")[2]: draw(value_for(k)) for k in keys}
        if draw(st.integers(0, 9)) == 0:
            mapping["bogus"] = 1
        return section, (None if draw(st.integers(0, 19)) == 0 else mapping)
    key = draw(st.sampled_from(sorted(LEAVES)))
    if form == "leaf-mapping":  # a mapping on a leaf: replaces (a dict-valued field) or is refused
        return key, draw(st.dictionaries(st.sampled_from(["a", "0"]), st.integers(0, 3), min_size=1, max_size=2))
    return key, draw(value_for(key))


def value_for(key: str):
    known = KNOWN.get(key, [])
    if not known:
        return JUNK
    return st.one_of(st.sampled_from(known), st.sampled_from(known), st.sampled_from(known), JUNK)


@settings(max_examples=80, deadline=None)
@given(start=st.sampled_from(sorted(STARTS)), overrides=st.lists(override(), min_size=1, max_size=4))
def test_set_overrides_match_the_reference_merge(start, overrides):
    cfg = STARTS[start]
    texts = [f"{key}={flow(value)}" for key, value in overrides]
    assert outcome(lambda: apply_overrides(cfg, texts)) == reference_apply(cfg, overrides), texts


@settings(max_examples=40, deadline=None)
@given(start=st.sampled_from(sorted(STARTS)), key=st.sampled_from(sorted(LEAVES) + sorted(SECTIONS)))
def test_setting_what_is_there_changes_nothing(start, key):
    """``--set key=<its current value>`` and ``--set section={the whole section}`` are the identity."""
    cfg = STARTS[start]
    tree = config_to_dict(cfg)
    section, _, leaf = key.partition(".")
    value = tree[section][leaf] if leaf else tree[section]
    assert apply_overrides(cfg, [f"{key}={flow(value)}"]) == cfg


# --- (b) image tensors of every dtype and range through the Python API -----------------------------

SIZE = 32
PHOTOS = 10  # 10 x 32 x 32 = 10,240 pixels: enough for the command line's calibration fit (10,000)
INTEGER = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KINDS = ("0..255", "0..1", "[-1, 1]", "overshoot", "nan", "inf")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny model with a per-pixel head, ten 32 px photographs, what ``hetvae eval`` and ``hetvae
    calibrate`` say of them, and the photographs as ``torchvision.io.read_image`` gives them (uint8)."""
    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    config = AutoencoderConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                               latent_channels=4, log_scale="pixel")
    model = AutoencoderKL(config).eval()
    with torch.no_grad():
        model.decoder.log_scale_head.weight.normal_(0, 0.3)
    checkpoint = save_autoencoder(model, root / "m.safetensors")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    for i in range(PHOTOS):
        smooth = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy) + i)], -1) * 0.45 + 0.5
        noisy = smooth + rng.normal(0, 0.1 * (i % 3), smooth.shape)
        Image.fromarray((noisy.clip(0, 1) * 255).round().astype(np.uint8)).save(photos / f"p{i}.png")
    assert main(["eval", str(checkpoint), "--images", str(photos), "--out", str(root / "e.json")]) == 0
    assert main(["calibrate", str(checkpoint), "--images", str(photos), "--out", str(root / "c")]) == 0
    listed = load_images(photos)
    predictor = load_predictor(checkpoint, calibrated=False)
    return {
        "predictor": predictor,
        "metrics": json.loads((root / "e.json").read_text()),
        "calibration": load_predictor(root / "c").calibration,
        "u8": [torch.from_numpy(read_image(p).copy()).permute(2, 0, 1).contiguous() for p in listed.sources],
        # what the command line feeds the model, and what the model makes of it
        "predictions": [predictor.predict(listed.load(i)) for i in range(len(listed))],
    }


def as_given(u8: torch.Tensor, dtype: torch.dtype, kind: str) -> torch.Tensor:
    """A photograph as a user might hand it over: raw 0..255, 0..1 (``ToTensor``), [-1, 1] (right),
    a resize's overshoot past [-1, 1], one NaN or one infinite value; in ``dtype``."""
    x = u8.double()
    x = {"0..255": x, "0..1": x / 255, "[-1, 1]": x / 127.5 - 1,
         "overshoot": torch.where(x == x.max(), 1.02, x / 127.5 - 1),
         "nan": torch.where(x == x.max(), math.nan, x / 127.5 - 1),
         "inf": torch.where(x == x.min(), -math.inf, x / 127.5 - 1)}[kind]
    if dtype == torch.bool:
        return x > 0
    if not dtype.is_floating_point:
        return torch.nan_to_num(x).round().clamp(torch.iinfo(dtype).min, torch.iinfo(dtype).max).to(dtype)
    return x.to(dtype)


REFUSALS = {
    "dtype": "convert 8-bit pixels (0..255) with x.float() / 127.5 - 1",
    "range": "expected an image in [-1, 1]: convert 8-bit values (0..255) with x / 127.5 - 1",
    "finite": "are NaN or infinite; expected an image of finite values in [-1, 1]",
}


def expected_refusal(dtype: torch.dtype, kind: str) -> str | None:
    if not dtype.is_floating_point:
        return REFUSALS["dtype"]
    if kind in ("0..255", "overshoot"):
        return REFUSALS["range"]
    if kind in ("nan", "inf"):
        return REFUSALS["finite"]
    return None  # [-1, 1], and 0..1 (a dark photograph as far as anyone can tell)


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(INTEGER + FLOAT), kind=st.sampled_from(KINDS),
       surface=st.sampled_from(["predict", "evaluate", "calibrate", "fit_calibration"]),
       batched=st.booleans(), which=st.integers(0, PHOTOS - 1))
def test_any_dtype_and_range_is_refused_or_scored_as_the_command_line_scores_it(
        scored, dtype, kind, surface, batched, which):
    predictor = scored["predictor"]
    given_images = [as_given(u8, dtype, kind) for u8 in scored["u8"]]
    if batched:  # (1, C, H, W), as a DataLoader gives one image
        given_images = [x[None] for x in given_images]
    references = scored["predictions"]
    call = {
        "predict": lambda: predictor.predict(given_images[which]),
        "evaluate": lambda: evaluate(predictor, given_images),
        "calibrate": lambda: calibrate(predictor, given_images),
        "fit_calibration": lambda: fit_calibration(
            torch.cat([x if x.ndim == 4 else x[None] for x in given_images]),
            torch.cat([p.mean for p in references]), torch.cat([p.log_scale for p in references]), predictor.family),
    }[surface]
    refusal = expected_refusal(dtype, kind)
    if refusal is not None:
        with pytest.raises(ValueError) as info:
            call()
        assert refusal in str(info.value), str(info.value)
        return
    result = call()
    if kind == "0..1":
        return  # scored as the dark photograph it cannot be told from; no command line reads it so
    exact = dtype in (torch.float32, torch.float64)  # float16 / bfloat16 hold k / 127.5 - 1 approximately
    if surface == "predict":
        want = references[which]
        tol = 1e-4 if exact else 0.05  # float64 rounded to float32 may differ from to_tensor's float32 by an ulp
        for got, ref in ((result.mean, want.mean), (result.log_scale, want.log_scale), (result.target, want.target)):
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    elif surface == "evaluate":
        for key in ("psnr", "nll_bpd", "coverage_50", "coverage_90", "calibration_error", "ause"):
            tol = 1e-5 if exact else {"psnr": 0.5, "nll_bpd": 0.05}.get(key, 0.02)
            assert math.isclose(result[key], scored["metrics"][key], rel_tol=tol, abs_tol=tol), key
    else:
        tol = 1e-4 if exact else 0.05
        torch.testing.assert_close(result.slope, scored["calibration"].slope, rtol=tol, atol=tol)
        torch.testing.assert_close(result.offset, scored["calibration"].offset, rtol=tol, atol=tol)


# --- (c) several saves into one folder: the weights read back are the last ones written ------------

TINY_MODEL = AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                               mid_block_attention=False)
WAYS = [  # (format, safe_serialization, variant): every combination save_pretrained takes
    ("hetvae", True, None), ("ldm", True, None),
    ("diffusers", True, None), ("diffusers", False, None), ("diffusers", True, "fp16"), ("diffusers", False, "fp16"),
]


def tiny_model(seed: int, head: bool, half: bool) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = AutoencoderKL(TINY_MODEL).eval()
    if head:
        model.add_log_scale_head(init=-1.0)
        with torch.no_grad():
            model.decoder.log_scale_head.weight.normal_(0, 0.5)
    return model.half() if half else model


def weights_of(model: AutoencoderKL) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in model.state_dict().items()}


def folder_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


SAVES = st.lists(st.tuples(st.sampled_from(WAYS), st.integers(0, 3), st.booleans(), st.booleans()),
                 min_size=1, max_size=5)


@settings(max_examples=25, deadline=None)
@given(saves=SAVES)
def test_the_weights_read_back_are_the_ones_last_written(saves):
    with tempfile.TemporaryDirectory() as name:
        folder = pathlib.Path(name) / "model"
        last = None
        for (fmt, safe, variant), seed, head, half in saves:
            model = tiny_model(seed, head, half)
            before = folder_bytes(folder) if folder.exists() else None
            try:
                model.save_pretrained(folder, format=fmt, safe_serialization=safe, variant=variant)
            except FileExistsError as error:
                # a model of another format there would be read instead: refused, the folder as it was
                assert last is not None and str(folder) in str(error), error
                assert folder_bytes(folder) == before
                continue
            last = weights_of(model)
            back = weights_of(AutoencoderKL.from_pretrained(folder))
            assert back.keys() == last.keys(), sorted(back.keys() ^ last.keys())
            for key in last:
                assert torch.equal(back[key], last[key]), key


def test_from_pretrained_takes_the_variant_it_was_saved_with(tmp_path):
    model = tiny_model(0, False, True)
    model.save_pretrained(tmp_path, format="diffusers", variant="fp16")
    back = AutoencoderKL.from_pretrained(tmp_path, variant="fp16")
    assert all(torch.equal(a, b) for a, b in zip(weights_of(model).values(), weights_of(back).values()))
