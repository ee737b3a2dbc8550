"""The tree's shape in numbers: lines per package, imports between modules (circles and
upward imports against the layer order), and the longest functions.

    python tools/arch_report.py            # table
    python tools/arch_report.py --json     # the same as JSON

The layer order is the contract of docs/architecture.md: a package may import only packages
of a lower layer (or its own). tests/test_layering.py asserts 0 circles and 0 upward imports.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lower number = lower layer. A package may import its own layer's package and any lower one.
LAYERS: dict[str, int] = {"retrieval": 0, "indexer": 1, "server": 1, "frontend": 2, "cir": 3}
PACKAGES = tuple(LAYERS)
# A narrower contract on top of the layers: what a package may import from a given lower one
# (prefixes of module names). The UI talks to the engine only through the typed client, the
# client's errors and the generated stubs, never through the service or its engine.
NARROW: dict[tuple[str, str], tuple[str, ...]] = {
    ("frontend", "server"): ("server.client", "server.client_errors", "server._generated"),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def iter_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        base = ROOT / pkg
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            if "_generated" in path.parts:
                continue
            out[module_name(path)] = path
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(mod: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module `mod` imports, at any depth in the file (function-level too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        # the longest prefix that is a project module
        parts = name.split(".")
        while parts:
            cand = ".".join(parts)
            if cand in modules:
                found.add(cand)
                return
            parts.pop()

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, is_pkg, node)
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    add(f"{target}.{alias.name}")
                else:
                    add(target)
    found.discard(mod)
    return found


def package_of(mod: str) -> str:
    return mod.split(".")[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of size > 1 (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def longest_functions(modules: dict[str, Path], n: int = 5) -> list[tuple[int, str]]:
    rows = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                rows.append((length, f"{mod}.{node.name} ({kind})"))
    rows.sort(reverse=True)
    defs = [r for r in rows if r[1].endswith("(def)")][:n]
    classes = [r for r in rows if r[1].endswith("(class)")][:n]
    return defs + classes


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Module -> the project modules it imports (any depth in the file)."""
    modules = iter_modules() if modules is None else modules
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def narrow_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that the layers allow but NARROW does not (e.g. frontend -> server.service)."""
    out = []
    for a, deps in graph.items():
        for b in deps:
            allowed = NARROW.get((package_of(a), package_of(b)))
            if allowed is not None and not any(
                b == pre or b.startswith(pre + ".") for pre in allowed
            ):
                out.append(f"{a} -> {b}")
    return sorted(out)


def report() -> dict:
    modules = iter_modules()
    graph = import_graph(modules)
    upward = sorted(
        f"{a} -> {b}"
        for a, deps in graph.items()
        for b in deps
        if LAYERS[package_of(b)] > LAYERS[package_of(a)]
        or (LAYERS[package_of(b)] == LAYERS[package_of(a)] and package_of(a) != package_of(b))
    )
    lines: dict[str, int] = defaultdict(int)
    for m, p in modules.items():
        lines[package_of(m)] += len(p.read_text().splitlines())
    pkg_graph: dict[str, set[str]] = defaultdict(set)
    for a, deps in graph.items():
        for b in deps:
            if package_of(a) != package_of(b):
                pkg_graph[package_of(a)].add(package_of(b))
    return {
        "lines": dict(sorted(lines.items())),
        "module_cycles": cycles(graph),
        "package_cycles": cycles(dict(pkg_graph)),
        "upward_imports": upward,
        "narrow_violations": narrow_violations(graph),
        "longest": longest_functions(modules),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rep = report()
    if args.json:
        print(json.dumps(rep, indent=1))
        return
    print("| package | lines |\n|---|---|")
    for k, v in rep["lines"].items():
        print(f"| {k} | {v} |")
    print(f"| total | {sum(rep['lines'].values())} |")
    print(f"\nmodule import circles: {len(rep['module_cycles'])}")
    for c in rep["module_cycles"]:
        print("  ", " <-> ".join(c))
    print(f"package import circles: {len(rep['package_cycles'])}")
    for c in rep["package_cycles"]:
        print("  ", " <-> ".join(c))
    print(f"upward imports: {len(rep['upward_imports'])}")
    for u in rep["upward_imports"]:
        print("  ", u)
    print(f"narrow-rule violations: {len(rep['narrow_violations'])}")
    for u in rep["narrow_violations"]:
        print("  ", u)
    print("\nlongest:")
    for length, name in rep["longest"]:
        print(f"  {length:5d}  {name}")


if __name__ == "__main__":
    main()
