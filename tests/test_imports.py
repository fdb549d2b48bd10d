"""The package's layers: every import under mixtral/ points down (or sideways) in the order the README's "What is
inside" table gives, and no modules import each other in a cycle. Imports inside functions count too: a late
import hides a cycle from Python's loader, not from the design."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mixtral"

# Low to high. A module may import modules of its own rank or below. The longest matching prefix decides; every
# `cli` module (the only ones that build argument parsers) sits at the top with the command itself.
RANKS = [
    ("mixtral.errors", 0), ("mixtral.config", 0), ("mixtral.batch_invariant", 0),
    ("mixtral.kernels", 1),
    ("mixtral.moe", 2), ("mixtral.cache", 2),
    ("mixtral.model", 3),
    ("mixtral.quant", 4),
    ("mixtral.io", 5), ("mixtral.offload", 5),
    ("mixtral.generate", 6), ("mixtral.data", 6), ("mixtral.analysis", 6), ("mixtral.parallel", 6),
    ("mixtral.train", 7), ("mixtral.serve", 7), ("mixtral.finetune", 7), ("mixtral.eval", 7),
    ("mixtral.bench", 8),
    ("mixtral.cli", 9),
]
CLI_RANK = 9
# `python -m mixtral` runs the command: above everything, and nothing inside the package may import it.
TOP = {"mixtral.__main__": 10}
FACADE = "mixtral"  # `import mixtral`, the public API: as high as the highest module it re-exports


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def rank(module: str) -> int:
    if module in TOP:
        return TOP[module]
    if module == FACADE:
        return max(rank(m) for m in GRAPH[FACADE])
    if module.split(".")[-1] == "cli":
        return CLI_RANK
    matches = [(len(prefix), r) for prefix, r in RANKS if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} has no place in RANKS: add it (and to the README's table)"
    return max(matches)[1]


def imports(module: str) -> set[str]:
    """The mixtral modules `module` imports anywhere in its file (`from a import b` counts as a.b when b is a
    module)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # `import mixtral.io.files` is the module mixtral.io.files
                name = name.rpartition(".")[0]
            if name.startswith("mixtral") and name != module:
                found.add(name)
    return found


GRAPH = {m: imports(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in TOP and m != FACADE))
def test_imports_point_down(module):
    upward = sorted(f"{d} (rank {rank(d)})" for d in GRAPH[module] if rank(d) > rank(module))
    assert not upward, f"{module} (rank {rank(module)}) imports a higher layer: {', '.join(upward)}"


def test_no_import_cycles():
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_upward_and_cyclic_imports(tmp_path):
    # The checker itself: a late import of the CLI from a low module is found, and so is a two-module cycle.
    assert rank("mixtral.serve.cli") == CLI_RANK > rank("mixtral.serve.engine")
    assert rank("mixtral.kernels.gemv") < rank("mixtral.moe") < rank("mixtral.model") < rank("mixtral.io.loading")
    source = "def f():\n    from mixtral.cli import main\n"
    names = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert names == {"mixtral.cli"}


def _module_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of the imports a file runs when it is imported (not those inside functions)."""
    found = []
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
    return found


def test_transformers_is_imported_only_where_it_is_used():
    # transformers is the oracle of some tests and the peer of the benchmarks, never a dependency: no module of
    # the package imports it when loaded, and a test file imports it at load time only through importorskip (so
    # without transformers the other tests still run).
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path in MODULES.values()
                 for line, name in _module_level_imports(path) if name.split(".")[0] == "transformers"]
    for path in sorted((PACKAGE.parent / "tests").glob("*.py")):
        offenders += [f"{path.relative_to(PACKAGE.parent)}:{line}" for line, name in _module_level_imports(path)
                      if name.split(".")[0] == "transformers" and "importorskip" not in path.read_text()]
    assert not offenders, f"transformers imported at load time: {', '.join(offenders)}"
