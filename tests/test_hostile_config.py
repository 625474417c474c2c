"""Issue 13 for the config engine: hostile keys, values and files give a correct config or a
ConfigError naming the culprit, never a raw traceback and never a silent coercion."""

import dataclasses
import math
import os

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from hetvae.config import Config, ModelConfig, TrainConfig, load_config, save_config
from hetvae.schema import ConfigError, apply_overrides, config_to_dict


def _write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- item 8: an empty value is not "null" -----------------------------------------------------


@pytest.mark.parametrize(
    "override", ["data.path=", "data.path=   ", "model.init_from=", "out_dir=", "train.ema_decay=", "data="]
)
def test_empty_override_is_an_error(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match="empty value") as info:
        apply_overrides(Config(), [override])
    assert info.value.key == key
    assert repr(override) in str(info.value)  # the whole override, as typed


def test_empty_override_names_null_where_null_is_valid():
    with pytest.raises(ConfigError, match=r"data\.path=null"):
        apply_overrides(Config(), ["data.path="])
    assert apply_overrides(Config(), ["data.path=/x", "data.path=null"]).data.path is None  # explicit null


@pytest.mark.parametrize("text", ["data:\n  path:\n", "data:\n  path: \n  resolution: 32\n", "out_dir:\n"])
def test_empty_path_in_a_file_is_an_error(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="empty value") as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert info.value.key in ("data.path", "out_dir")


def test_explicit_null_path_in_a_file_is_kept(tmp_path):
    for text in ("data:\n  path: null\n", "data:\n  path: ~\n", "data: {path: null}\n"):
        assert load_config(_write(tmp_path, text)).data.path is None


def test_empty_base_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="empty value") as info:
        load_config(_write(tmp_path, "base:\ntrain:\n  steps: 3\n"))
    assert info.value.key == "base"


# --- item 16: non-finite numbers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "train.weight_decay=.inf",
        "train.weight_decay=inf",
        "model.shift_factor=.nan",
        "model.shift_factor=nan",
        "model.scaling_factor=.inf",
        "model.scaling_factor=1e999",
        "train.grad_clip=.inf",
        "train.ema_decay=.nan",
        "log_scale.init=-.inf",
        "objective.disc_weight=.nan",
        "train.betas=[.nan, 0.9]",
        "data.rescale=[0.5, .nan]",
    ],
)
def test_non_finite_numbers_are_refused(override):
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError, match="finite") as info:
        apply_overrides(Config(), [override])
    assert info.value.key.startswith(key)
    assert any(word in str(info.value) for word in ("nan", "inf"))


def test_non_finite_numbers_in_a_file_name_key_value_and_file(tmp_path):
    path = _write(tmp_path, "model:\n  shift_factor: .nan\n")
    with pytest.raises(ConfigError, match=r"^model\.shift_factor: must be a finite number, got nan") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_non_finite_numbers_built_in_python_are_refused():
    with pytest.raises(ConfigError, match=r"^weight_decay: must be a finite number"):
        TrainConfig(weight_decay=math.inf)
    with pytest.raises(ConfigError, match=r"^shift_factor: must be a finite number"):
        ModelConfig(shift_factor=math.nan)


def test_huge_integers_are_errors_not_overflow():
    digits = "1" + "0" * 400
    with pytest.raises(ConfigError, match=r"^train\.lr: must be a finite number"):
        apply_overrides(Config(), [f"train.lr={digits}"])
    with pytest.raises(ConfigError, match=r"^train\.steps"):
        apply_overrides(Config(), ["train.steps=" + "9" * 5000])  # past Python's int-parsing limit
    with pytest.raises(ConfigError, match=r"^train\.seed"):
        apply_overrides(Config(), [f"train.seed={2**64}"])  # torch.manual_seed cannot take it


# --- the config file itself ----------------------------------------------------------------------


def test_config_path_that_is_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="folder") as info:
        load_config(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_config_path_that_is_a_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "cfg.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file") as info:
        load_config(fifo)
    assert str(fifo) in str(info.value)


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"train:\n  steps: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_config(tmp_path / "nowhere.yaml")


def test_override_below_a_section_set_to_a_value():
    with pytest.raises(ConfigError, match=r"^data: expected a mapping"):
        apply_overrides(Config(), ["data=5", "data.resolution=32"])
    # a section cannot be reset to null (issue 35, item 4: it reset every key to its default);
    # a mapping merges into it, key by key
    with pytest.raises(ConfigError, match=r"^data: expected a mapping of keys, got null"):
        apply_overrides(Config(), ["data.resolution=128", "data=null", "data.resolution=32"])
    cfg = apply_overrides(Config(), ["data.resolution=128", "data={path: x}", "data.resolution=32"])
    assert cfg.data.resolution == 32 and cfg.data.path == "x"
    assert apply_overrides(Config(), ["data.resolution=128", "data={path: x}"]).data.resolution == 128


def test_nul_in_a_path_is_refused():
    for override, key in [
        ('data.path="a\\0b"', "data.path"),
        ('model.init_from="vae\\0.ckpt"', "model.init_from"),
        ('out_dir="runs/\\0"', "out_dir"),
    ]:
        with pytest.raises(ConfigError, match="NUL") as info:
            apply_overrides(Config(), [override])
        assert info.value.key == key


# --- item 10: explicit scaling/shift factors override the checkpoint's ------------------------------


def _tiny_checkpoint(tmp_path, *, metadata: bool):
    import torch
    from safetensors.torch import save_file

    from hetvae.autoencoder import AutoencoderConfig, AutoencoderKL
    from hetvae.convert import save_autoencoder

    torch.manual_seed(0)
    model = AutoencoderKL(
        AutoencoderConfig(block_out_channels=(32, 64), layers_per_block=1, scaling_factor=0.5, shift_factor=0.25)
    )
    if metadata:  # config stored in the file
        return save_autoencoder(model, tmp_path / "vae.safetensors", format="ldm")
    file = tmp_path / "bare.safetensors"  # an SD-style single file: the factors are inferred (family "sd")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    return file


@pytest.mark.parametrize("metadata", [False, True])
def test_explicit_scaling_factor_overrides_the_checkpoint(tmp_path, metadata):
    from hetvae.build import build_model

    file = _tiny_checkpoint(tmp_path, metadata=metadata)
    base = ["data.resolution=32", f"model.init_from={file}"]
    inferred = build_model(apply_overrides(Config(), base)).config
    assert (inferred.scaling_factor, inferred.shift_factor) == ((0.5, 0.25) if metadata else (0.18215, 0.0))
    cfg = apply_overrides(Config(), [*base, "model.scaling_factor=0.13025", "model.shift_factor=0.0"])
    model = build_model(cfg)
    assert model.config.scaling_factor == 0.13025 and model.config.shift_factor == 0.0
    # ...and it survives the run folder's resolved config
    again = load_config(save_config(cfg, tmp_path / "run" / "config.yaml"))
    assert build_model(again).config.scaling_factor == 0.13025
    # a config that leaves them unset keeps the checkpoint's after a round trip too
    unset = load_config(save_config(apply_overrides(Config(), base), tmp_path / "run2" / "config.yaml"))
    assert build_model(unset).config.scaling_factor == inferred.scaling_factor


def test_scratch_model_scaling_factor():
    from hetvae.build import build_model

    small = ["model.block_out_channels=[32, 64]", "data.resolution=32"]
    assert build_model(apply_overrides(Config(), small)).config.scaling_factor == 0.18215
    cfg = apply_overrides(Config(), [*small, "model.scaling_factor=0.5", "model.shift_factor=-0.1"])
    model = build_model(cfg)
    assert (model.config.scaling_factor, model.config.shift_factor) == (0.5, -0.1)


# --- property-based: arbitrary overrides and YAML values -------------------------------------------


def _dotted_keys(cls=Config, prefix=""):
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            out.extend(_dotted_keys(f.default_factory, key + "."))
    return out


KEYS = _dotted_keys()
SECTIONS = [k for k in KEYS if "." not in k]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["scratch", "pixel", "global", "fp16", "cosine", "auto", "null", "~", "yes", "1e-5", ".nan"]),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
_value_texts = st.one_of(
    st.text(max_size=20),
    _values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()),
    st.sampled_from(
        ["", " ", "[]", "{}", "[32, 64]", ".inf", "-.inf", ".nan", "INF", "1e999", "-1e999", "null", "'", "[", "a: b",
         '""', "[.nan, 1]", "[0.5, .inf]", "[1, 2, 3]", "1" + "0" * 400, "9" * 5000, '"\\0"', "[[[[[[]]]]]]"]
    ),
)
_valid_keys = st.sampled_from(KEYS)
# mostly real keys (their values are where the defects hide), some malformed or unknown ones
_keys = st.one_of(_valid_keys, _valid_keys, _valid_keys, st.text(max_size=15), _valid_keys.map(lambda k: k + ".x"))


def _floats_are_finite(value):
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_floats_are_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_floats_are_finite(v) for v in value)
    return True


def _names_the_culprit(error: ConfigError, key: str, override: str) -> bool:
    message = str(error)
    if not key.strip() or "=" not in override:
        return repr(override) in message
    parts = [p for p in key.strip().split(".")]
    return error.key.startswith(key.strip()) or any(p and p in message for p in parts)


@given(key=_keys, text=_value_texts)
def test_any_override_gives_a_config_or_a_named_error(tmp_path_factory, key, text):
    override = f"{key}={text}"
    try:
        cfg = apply_overrides(Config(), [override])
    except ConfigError as error:
        assert str(error), override
        assert _names_the_culprit(error, key.partition("=")[0], override), (override, str(error))
        return
    tree = config_to_dict(cfg)
    assert _floats_are_finite(tree), override
    paths = cfg.data.path if isinstance(cfg.data.path, list) else [cfg.data.path] if cfg.data.path else []
    assert all(p.strip() and "\0" not in p for p in paths)
    assert cfg.model.init_from.strip() and cfg.out_dir.strip()
    if key.strip() in ("data.path", "model.init_from", "out_dir") and text.strip() == "":
        raise AssertionError(f"{override!r} was accepted")
    folder = tmp_path_factory.mktemp("cfg")
    assert load_config(save_config(cfg, folder / "config.yaml")) == cfg  # what is accepted can be recorded


_sections = st.dictionaries(
    st.sampled_from(SECTIONS + ["bogus"]),
    st.one_of(
        _values,
        st.dictionaries(st.sampled_from([k.split(".", 1)[1] for k in KEYS if "." in k] + ["nope"]), _values, max_size=4),
    ),
    max_size=4,
)


@given(tree=_sections)
def test_any_yaml_values_give_a_config_or_a_named_error(tmp_path_factory, tree):
    path = tmp_path_factory.mktemp("cfg") / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    try:
        cfg = load_config(path)
    except ConfigError as error:
        assert str(path) in str(error), str(error)
        assert error.key == "" or error.key.split(".")[0].split("[")[0] in tree, str(error)
        return
    assert _floats_are_finite(config_to_dict(cfg))


@given(text=st.text(max_size=60))
def test_any_yaml_text_gives_a_config_or_a_named_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        cfg = load_config(path)
    except ConfigError as error:
        assert str(path) in str(error), str(error)
        return
    assert _floats_are_finite(config_to_dict(cfg))


def _leaf_type(dotted):
    import typing

    tp = Config
    for part in dotted.split("."):
        tp = typing.get_type_hints(tp)[part]
    return tp


def _is_number_type(tp):
    import typing

    members = set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, type(int | None)) else {tp}
    return bool(members & {int, float}) and members <= {int, float, type(None)}


NUMBER_KEYS = [k for k in KEYS if "." in k and _is_number_type(_leaf_type(k))]


@given(
    key=st.sampled_from(NUMBER_KEYS),
    number=st.one_of(st.floats(), st.integers(min_value=-(10**400), max_value=10**400)),
    spelling=st.sampled_from(["yaml", "str", "repr"]),
)
def test_any_number_gives_that_number_or_a_named_error(key, number, spelling):
    text = {"yaml": yaml.safe_dump(number).strip().removesuffix("...").strip(), "str": str(number), "repr": repr(number)}[spelling]
    try:
        cfg = apply_overrides(Config(), [f"{key}={text}"])
    except ConfigError as error:
        section, leaf = key.split(".")
        assert error.key == key or leaf in str(error), (key, text, str(error))
        return
    section, leaf = key.split(".")
    got = getattr(getattr(cfg, section), leaf)
    assert isinstance(got, int) or (isinstance(got, float) and math.isfinite(got)), (key, text, got)
    assert got == number or math.isclose(got, number, rel_tol=1e-15), (key, text, got)


@pytest.mark.parametrize(
    "override, key",
    [("log_scale.init=-6.5", "log_scale.init"), ("log_scale.bounds=[-100, 3]", "log_scale.bounds"),
     ("log_scale.bounds=[-1.5, 0.4]", "log_scale.bounds")],
)
def test_log_scale_init_and_bounds_the_loss_would_refuse_are_config_errors(override, key):
    """The loss refuses an init within the soft clamp's margin of a bound and bounds beyond
    +-20 (issue 13, item 14); the config says so first, naming the key instead of failing later."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(Config(), [override, "log_scale.granularity=global"])
