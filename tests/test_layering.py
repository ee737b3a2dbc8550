"""Imports run one way (docs/architecture.md): no import circles, no upward imports.

The layer order is retrieval (0) < indexer, server (1, must not import each other) < frontend (2)
< cir (3); tools/arch_report.py measures it (``python tools/arch_report.py``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def arch() -> ModuleType:
    # tools/ is not a package (not in the wheel): load the script by path
    spec = importlib.util.spec_from_file_location("arch_report", ROOT / "tools" / "arch_report.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("arch_report", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rep(arch: ModuleType) -> dict:
    return arch.report()


@pytest.fixture(scope="module")
def graph(arch: ModuleType) -> dict[str, set[str]]:
    return arch.import_graph()


def test_layer_order_is_the_documented_one(arch: ModuleType) -> None:
    assert arch.LAYERS == {"retrieval": 0, "indexer": 1, "server": 1, "frontend": 2, "cir": 3}


def test_no_module_import_circles(rep: dict) -> None:
    assert rep["module_cycles"] == [], rep["module_cycles"]


def test_no_package_import_circles(rep: dict) -> None:
    assert rep["package_cycles"] == [], rep["package_cycles"]


def test_no_upward_imports(rep: dict) -> None:
    assert rep["upward_imports"] == [], rep["upward_imports"]


def test_each_package_imports_only_lower_layers(
    arch: ModuleType, graph: dict[str, set[str]]
) -> None:
    by_pkg: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        by_pkg.setdefault(arch.package_of(mod), set()).update(arch.package_of(d) for d in deps)
    for pkg in by_pkg:
        by_pkg[pkg].discard(pkg)
    assert by_pkg.get("retrieval", set()) == set()
    assert by_pkg.get("indexer", set()) <= {"retrieval"}
    assert by_pkg.get("server", set()) <= {"retrieval"}
    assert by_pkg.get("frontend", set()) <= {"retrieval", "server"}
    # nothing imports the command tree
    assert not any("cir" in deps for pkg, deps in by_pkg.items() if pkg != "cir")


def test_frontend_reaches_the_server_only_through_its_client(rep: dict) -> None:
    assert rep["narrow_violations"] == [], (
        "frontend may import from server only server.client, server.client_errors and "
        f"server._generated: {rep['narrow_violations']}"
    )


def test_the_generic_trainer_does_not_import_the_synthetic_world(
    graph: dict[str, set[str]],
) -> None:
    for trainer in ("retrieval.train", "retrieval.rerank_train"):
        assert "retrieval.data.shapes" not in graph[trainer], trainer
