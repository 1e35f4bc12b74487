"""DESIGN.md section 3's import direction, read statically (ast, nothing imported).

kernels <- onerec <- service, model_store <- onerec and service: a new upward edge (the model package
reaching into the service, the store into the model, ...) fails here. onerec_proto (the generated gRPC
contract) imports nothing of the project; loadtest talks to the service only over the wire, so
onerec_proto is the one project package it may import (its launcher starts the service as a subprocess).
The benchmarks sit on top and may use any of them; no package imports the test suite (the tests import
the benchmarks' case builders, not the other way round). Dynamic imports of project packages by name are
refused too, since a static reader could not see them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = {"kernels", "onerec", "onerec_proto", "model_store", "service", "loadtest", "benchmarks", "tests"}
ALLOWED = {
    "kernels": set(),
    "model_store": set(),
    "onerec_proto": set(),
    "onerec": {"kernels", "model_store"},
    "service": {"onerec", "onerec_proto", "model_store", "kernels"},
    "loadtest": {"onerec_proto"},
    "benchmarks": {"kernels", "onerec", "onerec_proto", "model_store", "service", "loadtest"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            found |= {f"dynamic:{n.split('.')[0]}" for n in names} or {"dynamic:?"}  # a name not spelled out
    return found


def test_each_package_imports_only_what_design_section_3_allows() -> None:
    problems = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_generated" in path.parts:
                continue  # generated stubs (their imports are protoc's)
            for name in imported_packages(path):
                target = name.removeprefix("dynamic:")
                if name.startswith("dynamic:") and (target in PROJECT or target == "?"):
                    problems.append(f"{path.relative_to(ROOT)}: imports {target} by name (invisible to a reader)")
                elif target in PROJECT and target != package and target not in allowed:
                    problems.append(f"{path.relative_to(ROOT)}: imports {target}")
    assert not problems, "\n".join(problems)


def test_the_launcher_reaches_the_service_only_over_the_wire() -> None:
    """loadtest/launcher.py starts `python -m service serve` and polls HTTP: it imports nothing of the project."""
    imported = imported_packages(ROOT / "loadtest" / "launcher.py")
    assert not {name.removeprefix("dynamic:") for name in imported} & (PROJECT | {"?"}), sorted(imported)


def test_the_rule_check_sees_an_upward_edge(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text(
        "import importlib\nfrom service.engine import client\nimportlib.import_module('loadtest.cli')\n"
        "for name in NAMES:\n    importlib.import_module(name)\nfrom tests.plugins import servers\n"
    )
    assert {"service", "dynamic:loadtest", "dynamic:?", "importlib", "tests"} <= imported_packages(sample)
