import dataclasses

import pytest

from hetvae.build import model_architecture_kwargs
from hetvae.config import Config, DataConfig, LogScaleConfig, ModelConfig, TrainConfig, load_config, save_config
from hetvae.schema import ConfigError, apply_overrides, config_to_dict, from_dict


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_round_trip(tmp_path):
    cfg = apply_overrides(
        Config(),
        [
            "model.block_out_channels=[16, 32]",
            "log_scale.granularity=pixel",
            "log_scale.bounds=[-5, 2.5]",
            "data.path=[a/b, c]",
            "train.ema_decay=0.999",
            "train.precision=bf16",
            "out_dir=yes",  # a YAML bool spelling, kept as text for a str field
        ],
    )
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    loaded = load_config(path)
    assert loaded == cfg
    assert loaded.out_dir == "yes" and loaded.model.block_out_channels == (16, 32)
    assert from_dict(Config, config_to_dict(cfg)) == cfg


def test_subset_of_keys_keeps_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, "train:\n  lr: 1e-5\n  betas: [0.5, 0.9]\n"))
    assert cfg.train.lr == 1e-5 and cfg.train.betas == (0.5, 0.9)  # "1e-5" is a string in YAML 1.1
    assert cfg.train.steps == TrainConfig().steps
    assert cfg.model == ModelConfig() and cfg.log_scale == LogScaleConfig()
    assert load_config(_write(tmp_path, "")) == Config()


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lrr.*did you mean 'train\.lr'") as info:
        load_config(_write(tmp_path, "train:\n  lrr: 0.1\n"))
    assert info.value.key == "train.lrr"
    assert "valid keys" in str(info.value) and "batch_size" in str(info.value)
    with pytest.raises(ConfigError, match=r"did you mean 'log_scale'"):
        apply_overrides(Config(), ["logscale.beta=0.5"])
    with pytest.raises(ConfigError, match=r"did you mean 'train\.lr'"):
        apply_overrides(Config(), ["train.lrr=0.1"])


def test_wrong_type_names_dotted_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^train\.batch_size: expected int, got 'eight' \(str\)") as info:
        load_config(_write(tmp_path, "train:\n  batch_size: eight\n"))
    assert info.value.key == "train.batch_size"
    with pytest.raises(ConfigError, match=r"model\.block_out_channels\[1\]: expected int"):
        apply_overrides(Config(), ["model.block_out_channels=[32, big]"])
    with pytest.raises(ConfigError, match=r"train\.decoder_only: expected bool, got 1"):
        apply_overrides(Config(), ["train.decoder_only=1"])
    with pytest.raises(ConfigError, match=r"log_scale\.bounds: expected list \[float, float\]"):
        apply_overrides(Config(), ["log_scale.bounds=[1, 2, 3]"])
    with pytest.raises(ConfigError, match=r"^data: expected a mapping"):
        from_dict(Config, {"data": 3})
    with pytest.raises(ConfigError, match=r"train\.lr: is a value, not a section"):
        apply_overrides(Config(), ["train.lr.x=1"])


def test_overrides_nested_tuple_bool_none():
    base = Config()
    cfg = apply_overrides(
        base,
        [
            "train.lr=1e-5",
            "log_scale.granularity=pixel",
            "model.block_out_channels=[32,64]",
            "train.decoder_only=true",
            "train.grad_clip=null",
            "train.ema_decay=none",
            "train.steps=1e4",
            "data.path=/data/photos",
            "data.path=null",  # an empty value is an error (tests/test_hostile_config.py)
        ],
    )
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.log_scale.granularity == "pixel"
    assert cfg.model.block_out_channels == (32, 64)
    assert cfg.train.decoder_only is True
    assert cfg.train.grad_clip is None and cfg.train.ema_decay is None
    assert cfg.train.steps == 10_000 and isinstance(cfg.train.steps, int)
    assert cfg.data.path is None  # the later override wins
    assert base == Config()  # the input is not modified
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides(base, ["train.lr"])


def test_invalid_choice_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), ["log_scale.granularity=pixels"])
    message = str(info.value)
    assert message.startswith("log_scale.granularity:")
    assert "'global', 'channel', 'pixel'" in message and "did you mean 'pixel'" in message
    with pytest.raises(ConfigError, match=r"train\.precision: expected one of 'fp32', 'bf16', 'fp16'"):
        apply_overrides(Config(), ["train.precision=fp8"])


def test_value_checks_name_the_key():
    cases = {
        "train.lr=-1": "train.lr",
        "train.lr=0": "train.lr",
        "log_scale.bounds=[3, -7]": "log_scale.bounds",
        "log_scale.init=5": "log_scale.init",
        "log_scale.beta=1.5": "log_scale.beta",
        "data.resolution=60": "data.resolution",
        "model.block_out_channels=[32, 60]": "model.block_out_channels[1]",
        "train.betas=[0.9, 1.0]": "train.betas[1]",
        "train.ema_decay=1.0": "train.ema_decay",
        "objective.kl_weight=-1e-6": "objective.kl_weight",
    }
    for override, key in cases.items():
        with pytest.raises(ConfigError) as info:
            apply_overrides(Config(), [override])
        assert info.value.key == key, override
        assert str(info.value).startswith(key + ":")
    # cross-section: 24 px crops do not down-sample 16x to an integer latent
    five_levels = "model.block_out_channels=[8, 8, 8, 8, 8]"
    factor_error = r"^data\.resolution: must be a multiple of the model's down-sampling factor 16"
    with pytest.raises(ConfigError, match=factor_error):
        apply_overrides(Config(), [five_levels, "data.resolution=24"])
    # ... but a checkpoint's architecture is its own
    apply_overrides(Config(), ["model.init_from=sd-vae", five_levels, "data.resolution=24"])
    with pytest.raises(ConfigError, match=r"^log_scale\.fit:"):
        apply_overrides(Config(), ["log_scale.granularity=pixel", "log_scale.fit=optimal"])


def test_final_crop_phase_checks_name_the_key():
    """train.final_steps / final_resolution: each inconsistent setting names its key."""
    base = ["data.resolution=32", "train.batch_size=16", "train.steps=100"]
    cases = {
        "train.final_steps=101": ("train.final_steps", "must not exceed"),
        "train.final_steps=-1": ("train.final_steps", ">= 0"),
        "train.final_resolution=60": ("train.final_resolution", "multiple of 8"),
        "train.final_steps=10": ("train.final_resolution", "must be set"),
    }
    for override, (key, words) in cases.items():
        with pytest.raises(ConfigError, match=words) as info:
            apply_overrides(Config(), [*base, override])
        assert info.value.key == key, override
    with pytest.raises(ConfigError, match=r"^train\.final_resolution: must be a multiple of the model's down"):
        apply_overrides(Config(), [*base, "model.block_out_channels=[8, 8, 8, 8, 8]", "train.final_steps=10",
                                   "train.final_resolution=8", "train.batch_size=64"])
    cfg = apply_overrides(Config(), [*base, "train.final_steps=100", "train.final_resolution=128"])
    assert (cfg.train.final_steps, cfg.train.final_resolution) == (100, 128)
    # a resolution alone, its phase switched off, is allowed (e.g. --set train.final_steps=0)
    apply_overrides(Config(), [*base, "train.final_resolution=128"])


def test_yaml_tags_are_refused(tmp_path):
    path = _write(tmp_path, "out_dir: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match="not a plain YAML file"):
        load_config(path)


def test_load_errors_name_the_file(tmp_path):
    path = _write(tmp_path, "data:\n  resolutoin: 64\n")
    with pytest.raises(ConfigError, match=r"data\.resolutoin: unknown key.*cfg\.yaml"):
        load_config(path)
    cfg = load_config(_write(tmp_path, "data: {}\n"), ["data.resolution=32"])
    assert cfg.data.resolution == 32
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_from_dict_generic_types():
    @dataclasses.dataclass(kw_only=True)
    class Inner:
        names: list[str] = dataclasses.field(default_factory=list)
        table: dict[str, float] = dataclasses.field(default_factory=dict)

    @dataclasses.dataclass(kw_only=True)
    class Outer:
        required: int
        inner: Inner = dataclasses.field(default_factory=Inner)
        maybe: tuple[int, ...] | None = None

    out = from_dict(Outer, {"required": 2.0, "inner": {"names": ["a"], "table": {"x": 1}}, "maybe": [1, 2]})
    assert out == Outer(required=2, inner=Inner(names=["a"], table={"x": 1.0}), maybe=(1, 2))
    assert isinstance(out.inner.table["x"], float)
    with pytest.raises(ConfigError, match=r"^required: required key is missing"):
        from_dict(Outer, {})
    with pytest.raises(ConfigError, match=r"^required: expected int, got 2\.5"):
        from_dict(Outer, {"required": 2.5})
    with pytest.raises(ConfigError, match=r"^inner\.names\[1\]: expected str, got 3"):
        from_dict(Outer, {"required": 1, "inner": {"names": ["a", 3]}})


def test_model_architecture_kwargs():
    kwargs = model_architecture_kwargs(ModelConfig(init_from="x", block_out_channels=(8, 16), norm_num_groups=8))
    assert "init_from" not in kwargs
    assert kwargs["block_out_channels"] == (8, 16) and kwargs["latent_channels"] == 4
    assert set(kwargs) == {f.name for f in dataclasses.fields(ModelConfig)} - {"init_from"}
    # the YAML schema can set every architecture field of the model, and nothing else
    from hetvae.autoencoder import AutoencoderConfig

    kept_for_exports = {"sample_size", "force_upcast", "latents_mean", "latents_std", "likelihood"}  # not architecture
    architecture = {
        f.name for f in dataclasses.fields(AutoencoderConfig)
        if not f.name.startswith("log_scale") and f.name not in kept_for_exports
    }
    assert set(kwargs) == architecture


def test_data_defaults_match_the_dataset():
    data = DataConfig()
    assert data.path is None and data.resolution == 64 and data.split == "train"


@pytest.mark.parametrize(
    ("coupling", "channels", "order", "expected"),
    [
        ("global", 3, None, (0, 2, 1)),  # RGB, global coefficients: the measured default, G last
        ("pixel", 3, None, (0, 1, 2)),  # a per-pixel head: R -> G -> B measured best
        ("global", 3, (0, 1, 2), (0, 1, 2)),  # an explicit order is kept
        ("global", 4, None, (0, 1, 2, 3)),  # no measured default: channel order
        ("none", 3, None, None),  # nothing to order
    ],
)
def test_a_null_coupling_order_resolves_to_the_measured_default(coupling, channels, order, expected):
    granularity = "pixel" if coupling == "pixel" else "global"
    cfg = Config(model=ModelConfig(out_channels=channels, in_channels=channels),
                 log_scale=LogScaleConfig(granularity=granularity, channel_coupling=coupling, coupling_order=order))
    assert cfg.log_scale.coupling_order == expected
    # the resolved order is what a saved config names, so a run reads back the order it trained with
    again = from_dict(Config, config_to_dict(cfg))
    assert again.log_scale.coupling_order == expected
