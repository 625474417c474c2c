"""A mapping in ``--set`` merges key by key into a section, as a ``base:`` file does; a section
set to null or left empty under a ``base:`` is refused (issue 35, item 4)."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from hetvae.config import Config, load_config
from hetvae.schema import ConfigError, apply_overrides, config_to_dict, from_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = load_config(CONFIGS / "tiny.yaml")
SECTIONS = [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)]


def _reference_merge(base, over):
    """The merge the docs describe, on plain dicts: mappings key by key, anything else replaces."""
    out = {k: v for k, v in base.items()}
    for k, v in over.items():
        out[k] = _reference_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flow(value):
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def test_a_mapping_merges_into_the_section():
    """The issue's case: two train keys set, tiny.yaml's 14 others kept (they were reset to defaults)."""
    cfg = apply_overrides(TINY, ["train={steps: 1000, final_steps: 0}"])
    assert cfg == dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, steps=1000, final_steps=0))
    cfg = apply_overrides(TINY, ["log_scale={granularity: global}"])
    assert cfg.log_scale == dataclasses.replace(TINY.log_scale, granularity="global")
    assert cfg.log_scale.faithful and cfg.log_scale.head_layers == 2  # were turned off
    assert apply_overrides(TINY, ["data={}"]) == TINY  # nothing to merge
    # later overrides still win, in order; a list replaces the whole list
    cfg = apply_overrides(TINY, ["train.lr=1e-3", "train={lr: 2e-3, betas: [0.5, 0.9]}", "train.steps=900"])
    assert (cfg.train.lr, cfg.train.betas, cfg.train.steps) == (2e-3, (0.5, 0.9), 900)
    assert cfg.train.head_lr == TINY.train.head_lr


@pytest.mark.parametrize("section", SECTIONS)
@pytest.mark.parametrize("null", ["null", "~", "Null", "NULL", " null "])
def test_a_section_set_to_null_is_refused(section, null):
    with pytest.raises(ConfigError, match="would reset every key") as info:
        apply_overrides(TINY, [f"{section}={null}"])
    assert info.value.key == section
    assert f"{section}.KEY=VALUE" in str(info.value) and f"{section}={{KEY: VALUE}}" in str(info.value)


def test_an_empty_section_override_suggests_no_null():
    with pytest.raises(ConfigError, match="empty value") as info:
        apply_overrides(TINY, ["train="])
    assert "train=null" not in str(info.value)  # null is refused for a section: no hint towards it


@pytest.mark.parametrize("section", SECTIONS)
@pytest.mark.parametrize("empty", ["{section}:\n", "{section}: null\n", "{section}: ~\n", "{section}:  # later\n"])
def test_an_empty_section_under_a_base_is_refused(tmp_path, section, empty):
    (tmp_path / "child.yaml").write_text(f"base: {CONFIGS / 'tiny.yaml'}\n" + empty.format(section=section))
    with pytest.raises(ConfigError, match="would reset every key") as info:
        load_config(tmp_path / "child.yaml")
    assert info.value.key == section
    assert "child.yaml" in str(info.value) and f"leave {section} out" in str(info.value)


def test_an_empty_section_without_a_base_is_the_defaults(tmp_path):
    """Nothing to inherit there: ``train:`` and leaving it out mean the same."""
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\ndata: null\n")
    assert load_config(path) == Config()


def test_an_empty_mapping_under_a_base_keeps_the_base(tmp_path):
    (tmp_path / "child.yaml").write_text(f"base: {CONFIGS / 'tiny.yaml'}\ntrain: {{}}\nout_dir: {TINY.out_dir}\n")
    assert load_config(tmp_path / "child.yaml") == TINY


# --- property: --set mappings and lists against a reference merge of plain dicts -----------------


def _field_values(section):
    """Per key of ``section``: the values the shipped configs and the defaults give it."""
    configs = [Config(), TINY] + [load_config(p) for p in sorted(CONFIGS.glob("*.yaml"))]
    table = {}
    for cfg in configs:
        for key, value in config_to_dict(getattr(cfg, section)).items():
            table.setdefault(key, [])
            if value not in table[key]:
                table[key].append(value)
    return table


FIELD_VALUES = {section: _field_values(section) for section in SECTIONS}
_junk = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.floats(-10, 10, allow_nan=False),
    st.sampled_from(["pixel", "cosine", "auto", "yes", "1e-5", ""]),
    st.lists(st.integers(1, 64), max_size=4),
    st.dictionaries(st.sampled_from(["a", "steps", "lr"]), st.integers(0, 9), max_size=2),
)


@st.composite
def _section_mappings(draw):
    section = draw(st.sampled_from(SECTIONS))
    table = FIELD_VALUES[section]
    keys = draw(st.lists(st.sampled_from(sorted(table)), max_size=5, unique=True))
    mapping = {}
    for key in keys:
        # mostly values that pass, some that do not
        mapping[key] = draw(_junk if draw(st.integers(0, 9)) == 0 else st.sampled_from(table[key]))
    if draw(st.integers(0, 9)) == 0:
        mapping["bogus"] = 1
    return section, mapping


def _outcome(build):
    try:
        return "ok", build()
    except ConfigError as error:
        return "error", error.key


@given(start=st.sampled_from(["default", "tiny"]), overrides=st.lists(_section_mappings(), min_size=1, max_size=3))
def test_mapping_overrides_match_a_reference_merge(start, overrides):
    cfg = Config() if start == "default" else TINY
    texts = [f"{section}={_flow(mapping)}" for section, mapping in overrides]
    tree = config_to_dict(cfg)
    for section, mapping in overrides:
        tree = _reference_merge(tree, {section: mapping})
    expected = _outcome(lambda: from_dict(Config, tree))  # checked once, after the last override
    assert _outcome(lambda: apply_overrides(cfg, texts)) == expected, texts


@given(section_mapping=_section_mappings())
def test_a_mapping_override_is_a_base_file(tmp_path_factory, section_mapping):
    """``--set section={...}`` over tiny.yaml gives what a child file ``base: tiny.yaml`` with that
    section gives: one merge rule for both."""
    section, mapping = section_mapping
    folder = tmp_path_factory.mktemp("child")
    (folder / "child.yaml").write_text(
        yaml.safe_dump({"base": str(CONFIGS / "tiny.yaml"), section: mapping}), encoding="utf-8"
    )
    by_file = _outcome(lambda: load_config(folder / "child.yaml"))
    by_override = _outcome(lambda: apply_overrides(TINY, [f"{section}={_flow(mapping)}"]))
    if by_file[0] == "ok":
        assert by_override == by_file, mapping
    else:  # both refused, naming a key of the mapping (which one first may follow the files' key order)
        assert by_override[0] == "error", mapping
        named = {f"{section}.{key}" for key in mapping} | {section}
        same = by_file[1] == by_override[1]
        assert same or {by_file[1].split("[")[0], by_override[1].split("[")[0]} <= named, (mapping, by_file, by_override)


@given(
    key=st.sampled_from(["model.block_out_channels", "log_scale.bounds", "train.betas", "data.rescale", "data.path"]),
    value=st.one_of(
        st.lists(st.integers(1, 256), max_size=5),
        st.lists(st.floats(-8, 8, allow_nan=False), min_size=2, max_size=2),
        st.lists(st.sampled_from(["a", "b/c"]), min_size=1, max_size=3),
        st.dictionaries(st.sampled_from(["0", "x"]), st.integers(0, 9), max_size=2),
    ),
)
def test_list_overrides_replace_as_the_reference_does(key, value):
    section, leaf = key.split(".")
    expected = _outcome(lambda: from_dict(Config, _reference_merge(config_to_dict(TINY), {section: {leaf: value}})))
    assert _outcome(lambda: apply_overrides(TINY, [f"{key}={_flow(value)}"])) == expected
    assert _outcome(lambda: apply_overrides(TINY, [f"{section}={_flow({leaf: value})}"])) == expected
