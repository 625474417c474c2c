"""The lists in the docs that repeat the code are checked against it: the config defaults of
docs/config.md, the keys a resume may change and the exit codes of docs/runs.md. Also: relative
links in the README and docs/ point at files and headings that exist, and every benchmark opens
with a line naming the doc figure it backs."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first markdown table after ``heading`` (cells stripped)."""
    start = text.index(heading)
    rows, seen_table = [], False
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            seen_table = True
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if set("".join(cells)) <= set("-: "):
                continue  # the separator row
            rows.append(cells)
        elif seen_table:
            break
    return rows[1:]  # without the header row


def code(cell: str) -> str:
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"expected one `code` span, got {cell!r}"
    return match.group(1)


def flat_defaults(obj, prefix: str = "") -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_defaults(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = list(value) if isinstance(value, tuple) else value
    return out


def test_config_md_lists_every_key_with_its_default():
    from hetvae.config import Config

    text = (DOCS / "config.md").read_text()
    documented = {}
    for match in re.finditer(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", text, re.M):
        key, value = match.groups()
        assert key not in documented, f"docs/config.md documents {key} twice"
        documented[key] = yaml.safe_load(value)
    defaults = flat_defaults(Config())
    assert sorted(documented) == sorted(defaults), (
        f"missing from docs/config.md: {sorted(set(defaults) - set(documented))}; "
        f"documented but not in Config: {sorted(set(documented) - set(defaults))}")
    wrong = {k: (documented[k], v) for k, v in defaults.items() if documented[k] != v or type(documented[k]) is not type(v)}
    assert not wrong, f"docs/config.md defaults differ from Config() (doc, code): {wrong}"


def test_runs_md_lists_exactly_the_keys_a_resume_may_change():
    from hetvae.runs import RESUME_MAY_CHANGE

    rows = table_rows((DOCS / "runs.md").read_text(), "## Resuming a run")
    documented = [code(row[0]) for row in rows]
    assert len(documented) == len(set(documented))
    assert set(documented) == set(RESUME_MAY_CHANGE), (
        f"missing from docs/runs.md: {sorted(set(RESUME_MAY_CHANGE) - set(documented))}; "
        f"not in RESUME_MAY_CHANGE: {sorted(set(documented) - set(RESUME_MAY_CHANGE))}")


def train_epilog_codes() -> set[int]:
    from hetvae.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    epilog = sub.choices["train"].epilog
    block = epilog[epilog.index("exit codes:"):]
    return {int(c) for c in re.findall(r"^\s+(\d+)\s", block, re.M)}


def test_runs_md_exit_codes_match_the_command_line():
    rows = table_rows((DOCS / "runs.md").read_text(), "## Exit codes")
    documented = {int(row[0]): row[1] for row in rows}
    assert all(commands in ("all", "train") for commands in documented.values())
    # what `hetvae train --help` lists, the doc lists for train (as "train" or "all")
    for_train = {c for c, commands in documented.items() if commands in ("all", "train")}
    epilog = train_epilog_codes()
    assert epilog <= for_train, f"hetvae train --help lists codes docs/runs.md does not: {sorted(epilog - for_train)}"
    train_only = {c for c, commands in documented.items() if commands == "train"}
    assert train_only <= epilog, f"docs/runs.md says only train exits with {sorted(train_only - epilog)}, --help does not"
    # the two every command shares beyond train's list: argparse's 2, and a closed pipe's 128 + SIGPIPE
    assert for_train - epilog == {2, 141}


def test_no_command_exits_2_as_documented():
    from hetvae.cli import main

    assert main([]) == 2


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


MARKDOWN = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.name} links to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{doc.name} links to {target}: no such heading"


BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_names_the_figure_it_backs(script):
    doc = ast.get_docstring(ast.parse(script.read_text()))
    assert doc, f"{script.name} has no module docstring"
    first = doc.splitlines()[0]
    links = re.findall(r"docs/(\w+\.md)#([\w-]+)", first)
    assert links, f"{script.name}: the docstring's first line names no docs/FILE.md#heading"
    for file, anchor in links:
        assert anchor in anchors(DOCS / file), f"{script.name}: docs/{file} has no heading #{anchor}"
    assert not re.search(r"session|issue \[|\b20\d\d-\d\d-\d\d\b", doc), f"{script.name}: dated or issue text"


@pytest.mark.parametrize("doc", MARKDOWN + sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_no_diary_in_the_docs(doc):
    if doc.name == "CHANGELOG.md":
        pytest.skip("the changelog is the history")
    text = doc.read_text()
    if doc.suffix == ".yaml":
        text = "\n".join(line.partition("#")[2] for line in text.splitlines())
    for pattern in (r"\bsession\b", r"\bissue \d", r"\[\d/\d\]", r"\b20\d\d-\d\d-\d\d\b"):
        assert not re.search(pattern, text, re.I), f"{doc.name}: {pattern} ({re.search(pattern, text, re.I).group()})"
