"""The README's commands and snippets run as written on a fresh clone.

Every ```bash line and every ```python block of README.md is extracted and accounted for: the
python blocks are executed; the ``hetvae`` commands run in order through ``hetvae.cli.main`` in a
scratch folder holding a copy of configs/, with ``hetvae train`` shortened to a few steps. A
command that needs what a clone does not have (a user's own SD VAE, the package registry) is
checked for its argument parsing and config only, and says why below. A command the test does not
know fails it, so a new README line cannot go unchecked."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# appended to every README `hetvae train`: a couple of steps, no large-crop phase, no panels
CHEAP_TRAIN = ["--set", "train.steps=2", "--set", "train.final_steps=0", "--set", "train.sample_every=0",
               "--set", "train.checkpoint_every=2", "--set", "train.log_every=1", "--set", "train.batch_size=4",
               "--set", "data.samples_per_epoch=16", "--no-progress"]
# paths that stand for the user's own files: commands naming them are parsed, not run
USER_PATHS = ("/models/", "/data/")


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.S | re.M)


def bash_commands() -> list[str]:
    """Each command of the README's bash blocks: continuations joined, comments dropped, `&&` split."""
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in line.split("&&"))
    return commands


def test_readme_has_what_this_test_checks():
    commands = bash_commands()
    assert "hetvae train configs/tiny.yaml" in commands and "python -m pytest -q" in commands
    assert blocks("python"), "the README's loss snippet is gone"


def write_heldout(folder: Path) -> None:
    """Three small colour photographs standing in for benchmarks/heldout_photos.py's six (which need
    the package registry): enough pixels for hetvae calibrate's fit (10,000 values per channel)."""
    import skimage.data
    from PIL import Image

    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        image = getattr(skimage.data, name)()[:96, :96]
        Image.fromarray(np.ascontiguousarray(image)).save(folder / f"{name}.png")


def parse_only(argv: list[str]) -> None:
    """The arguments parse, and a `train` command's config (with its overrides) loads."""
    from hetvae.cli import build_parser
    from hetvae.config import load_config

    args = build_parser().parse_args(argv)
    if argv[0] == "train":
        load_config(args.config, args.overrides)


def run_heldout_photos_parsing(argv: list[str], monkeypatch) -> None:
    """benchmarks/heldout_photos.py downloads wheels with `pip download`: a clone has no registry
    here, so the test stops it at its first download and checks the folder it was given."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import heldout_photos

    class Stop(Exception):
        pass

    def no_registry(cmd, **kwargs):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
        raise Stop

    monkeypatch.setattr(heldout_photos.subprocess, "run", no_registry)
    with pytest.raises(Stop):
        heldout_photos.main(argv)
    assert Path(argv[0]).is_dir()
    Path(argv[0]).rmdir()


def test_readme_commands_run(tmp_path, monkeypatch, capsys):
    from hetvae.cli import main

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    for command in bash_commands():
        argv = shlex.split(command)
        if argv[:2] == ["pip", "install"]:
            continue  # the environment running this test is that install
        if argv == ["python", "-m", "pytest", "-q"]:
            continue  # this suite
        if argv[:2] == ["python", "benchmarks/heldout_photos.py"]:
            run_heldout_photos_parsing(argv[2:], monkeypatch)
            write_heldout(tmp_path / argv[2])
            continue
        assert argv[0] == "hetvae", f"README command this test does not know: {command}"
        argv = argv[1:]
        if any(a.startswith(USER_PATHS) or f"={USER_PATHS[0]}" in a or f"={USER_PATHS[1]}" in a for a in argv):
            parse_only(argv)  # a user's own SD VAE and photographs: not in a clone
            continue
        if argv[0] == "train":
            argv = argv + CHEAP_TRAIN
        code = main(argv)
        out = capsys.readouterr()
        assert code == 0, f"`{command}` exited {code}:\n{out.out}\n{out.err}"
    assert (tmp_path / "runs/tiny/model.safetensors").is_file()
    assert (tmp_path / "runs/tiny-global/model.safetensors").is_file()
    assert any((tmp_path / "maps").rglob("*_panel.png"))
    assert (tmp_path / "metrics.json").is_file() and any((tmp_path / "comparison").iterdir())


def test_readme_python_runs():
    """The snippets run; the loss snippet's optimiser holds the loss's learnable scale and its step
    moves it (SD's logvar was learnable but in no optimiser, so it never moved)."""
    import torch

    checked = False
    for index, block in enumerate(blocks("python")):
        torch.manual_seed(0)
        namespace: dict = {}
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
        if "opt" in namespace and "crit" in namespace:
            crit, opt = namespace["crit"], namespace["opt"]
            held = {id(p) for group in opt.param_groups for p in group["params"]}
            scales = list(crit.parameters())
            assert scales and all(id(p) in held for p in scales)
            assert all(not torch.equal(p, torch.zeros_like(p)) for p in scales)
            checked = True
    assert checked, "no README snippet puts a loss's scale in an optimiser"
