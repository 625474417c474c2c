"""``base:`` chains: ``~`` is the home folder, and a very deep chain is a ConfigError naming its
depth and file, not the YAML reader's RecursionError (issue 35, item 23)."""

import pytest

from hetvae.config import MAX_BASE_DEPTH, load_config
from hetvae.schema import ConfigError


@pytest.mark.parametrize("spelling", ["~/parent.yaml", "~/sub/../parent.yaml"])
def test_base_under_home_is_expanded(tmp_path, monkeypatch, spelling):
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    (home / "parent.yaml").write_text("train: {steps: 7, lr: 1e-3}\n")
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    (work / "child.yaml").write_text(f"base: {spelling}\ntrain: {{steps: 9}}\n")
    cfg = load_config(work / "child.yaml")
    assert (cfg.train.steps, cfg.train.lr) == (9, 1e-3)


def test_a_missing_base_under_home_names_the_expanded_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "child.yaml").write_text("base: ~/nowhere.yaml\n")
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(tmp_path / "child.yaml")
    assert str(tmp_path / "nowhere.yaml") in str(info.value)


def _chain(folder, files):
    """c0.yaml (steps 5) <- c1.yaml <- ... <- c{files-1}.yaml; returns the last."""
    (folder / "c0.yaml").write_text("train: {steps: 5}\n")
    for i in range(1, files):
        (folder / f"c{i}.yaml").write_text(f"base: c{i - 1}.yaml\n")
    return folder / f"c{files - 1}.yaml"


def test_a_chain_of_the_limit_loads(tmp_path):
    assert load_config(_chain(tmp_path, MAX_BASE_DEPTH)).train.steps == 5


@pytest.mark.parametrize("files", [MAX_BASE_DEPTH + 1, 300, 1500])
def test_a_deeper_chain_is_a_named_error(tmp_path, files):
    """1500 files was a RecursionError 'maximum recursion depth exceeded' reported against some file
    in the middle of the chain."""
    top = _chain(tmp_path, files)
    with pytest.raises(ConfigError) as info:
        load_config(top)
    message = str(info.value)
    assert info.value.key == "base"
    assert f"at most {MAX_BASE_DEPTH} files" in message and str(top) in message
    assert "Recursion" not in message


def test_a_long_cycle_is_still_a_cycle(tmp_path):
    for i in range(5):
        (tmp_path / f"c{i}.yaml").write_text(f"base: c{(i + 1) % 5}.yaml\n")
    with pytest.raises(ConfigError, match="circular base chain"):
        load_config(tmp_path / "c0.yaml")


def test_load_config_expands_home_in_its_own_path(tmp_path, monkeypatch):
    """The Python API's sibling of ``base: ~/x.yaml``: ``load_config("~/x.yaml")``."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "x.yaml").write_text("train: {steps: 3}\n")
    assert load_config("~/x.yaml").train.steps == 3
