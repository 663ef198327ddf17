"""The package structure: imports point only down, no module imports itself back, files stay short.

Layers, lowest first: codec < conditioning < lm < inference < inference.cli < demos. Every import
statement counts, also one inside a function (a lazy import hides a cycle, it does not remove
it); only ``if TYPE_CHECKING:`` blocks are skipped. The walk is static (ast), so it sees code
paths no test runs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("codec", "conditioning", "lm", "inference", "demos")
LAYERS = ("codec", "conditioning", "lm", "inference", "inference.cli", "demos")
# `python -m inference` is the command line's entry point: it belongs to the CLI's layer.
ALIASES = {"inference.__main__": "inference.cli"}
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def layer(module: str) -> int:
    """The index in LAYERS of the deepest layer ``module`` belongs to."""
    module = ALIASES.get(module, module)
    best = -1
    for index, name in enumerate(LAYERS):
        if module == name or module.startswith(name + "."):
            best = index
    return best


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(module: str) -> set[str]:
    """Our modules that ``module`` imports anywhere in its code (resolved to modules we have)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in MODULES:  # `from codec.model import X` -> codec.model
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                full = f"{prefix}.{alias.name}"
                add(full if full in MODULES else prefix)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return found


GRAPH = {module: imports(module) for module in MODULES}


def test_the_walk_sees_our_packages():
    assert {"codec.model", "lm.model", "inference.generator"} <= set(MODULES)
    assert "codec.model" in GRAPH["inference.generator"] or any(
        m.startswith("codec") for m in GRAPH["inference.generator"])


def test_imports_only_point_down():
    upward = sorted(f"{module} ({LAYERS[layer(module)]}) imports {target} ({LAYERS[layer(target)]})"
                    for module, targets in GRAPH.items() for target in targets
                    if layer(target) > layer(module))
    assert not upward, "upward imports:\n" + "\n".join(upward)


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(GRAPH[node]):
            if target.startswith(node + "."):
                continue  # a package's __init__ re-exporting its own modules is not a cycle
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            connect(node)
    return components


def test_no_import_cycles():
    cycles = _cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_package_files_stay_short(module):
    lines = MODULES[module].read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines (> {MAX_LINES})"


def test_no_caller_checks_which_codec_it_holds():
    """Mono models and InterleavedStereo share one codec interface (base_model, interleaved,
    encode_to_codes, decode): outside codec/model.py nothing asks which one it has."""
    offenders = [f"{MODULES[m].relative_to(ROOT)}:{n}" for m in MODULES if m != "codec.model"
                 for n, line in enumerate(MODULES[m].read_text(encoding="utf-8").splitlines(), 1)
                 if "isinstance(" in line and "InterleavedStereo" in line]
    assert not offenders, "type checks on the codec: " + ", ".join(offenders)


def test_the_codec_interface_is_shared():
    import torch

    from codec.model import EncodecModel, InterleavedStereo
    from codec.pretrained import random_model

    mono = random_model("encodec_24khz")
    stereo = InterleavedStereo(mono)
    assert (mono.interleaved, stereo.interleaved) == (False, True)
    assert mono.base_model is mono and stereo.base_model is mono
    wav = torch.randn(1, 2, 2400, generator=torch.Generator().manual_seed(0)) * 0.1
    codes = stereo.encode_to_codes(wav, 2)
    # Both channels as one batch of mono items, as the stereo wrapper runs them: the same arithmetic
    # (a single-item batch may round differently and flip a near-tie code of this random codec).
    both = mono.encode_to_codes(wav.transpose(0, 1), 2)
    assert codes.shape[1] == 4 and torch.equal(codes[:, 0::2], both[:1]) and torch.equal(codes[:, 1::2], both[1:])
    assert stereo.decode(codes).shape[:2] == (1, 2) and isinstance(mono, EncodecModel)
