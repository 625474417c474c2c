"""``hetvae --version`` and ``python -m hetvae``: the same command by either name, and one version
everywhere it is stated (the package, its metadata, pyproject.toml)."""

from __future__ import annotations

import importlib.metadata
import pathlib
import subprocess
import sys
import re

import pytest

import hetvae
from hetvae.cli import main as cli_main

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_version_is_one_everywhere(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hetvae {hetvae.__version__}"
    declared = re.search(r'(?m)^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text()).group(1)
    assert hetvae.__version__ == declared == importlib.metadata.version("hetvae")


def test_python_m_hetvae_is_the_command(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "hetvae", *args], capture_output=True, text=True,
                              timeout=300, cwd=tmp_path, check=False)

    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"hetvae {hetvae.__version__}"
    usage = run("--help")
    assert usage.returncode == 0 and usage.stdout.startswith("usage: hetvae")
    missing = run("info", str(tmp_path / "nowhere"))
    assert missing.returncode != 0 and "nowhere" in missing.stderr
    assert missing.returncode == cli_main_code(["info", str(tmp_path / "nowhere")])


def cli_main_code(argv: list[str]) -> int:
    try:
        return cli_main(argv)
    except SystemExit as exit_:  # argparse refusals exit
        return int(exit_.code)
