"""The package's layout (docs/architecture.md): modules import each other in one direction, the top
level is lazy, and the command line's help imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hetvae

PACKAGE = Path(hetvae.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
# the one intended pair: AutoencoderKL.from_pretrained / save_pretrained call the converters, which build AutoencoderKL
ALLOWED_INNER = {("autoencoder", "convert")}
# modules whose functions import per command, so that `hetvae --help` stays fast
LAZY_MODULES = {"cli"}


def _imports(module: str) -> tuple[set[str], set[str]]:
    """``(modules imported at the top level, modules imported inside functions)`` of ``hetvae.<module>``."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    inner_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    top, inner = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "hetvae":
            parts = node.module.split(".")
            names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("hetvae.")]
        targets = {n for n in names if n in MODULES and n != module}
        (inner if id(node) in inner_nodes else top).update(targets)
    return top, inner


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_loop_but_the_autoencoder_convert_pair():
    edges = {m: set() for m in MODULES}
    for m in MODULES:
        top, inner = _imports(m)
        edges[m] |= top | inner
    loops = _cycles(edges)
    assert loops in ([], [["autoencoder", "convert"]]), f"import loops: {loops} (docs/architecture.md)"
    # without the intended pair's function-level imports there is no loop at all
    for a, b in ALLOWED_INNER:
        edges[a].discard(b)
    assert _cycles(edges) == []


@pytest.mark.parametrize("module", MODULES)
def test_package_imports_sit_at_the_top(module):
    """A hetvae module imported inside a function hides a loop; only the command line imports per command."""
    if module in LAZY_MODULES:
        return
    _, inner = _imports(module)
    assert {(module, m) for m in inner} <= ALLOWED_INNER, f"hetvae.{module} imports {sorted(inner)} inside functions"


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_hetvae_imports_no_torch_and_names_resolve_on_use():
    assert "torch" not in _modules_after("import hetvae")
    loaded = _modules_after("import hetvae\nhetvae.HeteroscedasticNLL")
    assert {"torch", "hetvae.loss"} <= loaded and "hetvae.train" not in loaded
    for name in hetvae.__all__:
        assert getattr(hetvae, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        hetvae.nothing  # noqa: B018


def test_help_imports_no_torch():
    loaded = _modules_after(
        "import contextlib, io\nfrom hetvae.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    main(['--help'])"
    )
    assert "torch" not in loaded and "hetvae.train" not in loaded


def test_architecture_md_lists_every_module_with_its_imports():
    """docs/architecture.md's table is the layout: every module, and what it imports at the top."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    rows, floors = {}, {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].startswith("`") and cells[1].endswith(".py`"):
            module = cells[1].strip("`")[:-3]
            rows[module], floors[module] = cells[3], int(cells[0])
    assert sorted(rows) == MODULES
    for module, listed in rows.items():
        if module in LAZY_MODULES:
            continue
        documented = {name.strip() for name in listed.split("(")[0].split(",") if name.strip() != "nothing"}
        top, _ = _imports(module)
        assert documented == top, f"docs/architecture.md, {module}.py: lists {sorted(documented)}, imports {sorted(top)}"
        higher = sorted(m for m in top if floors[m] >= floors[module])
        assert not higher, f"docs/architecture.md: {module}.py (floor {floors[module]}) imports {higher} from its floor or above"
