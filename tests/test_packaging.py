"""pyproject.toml: an SPDX license string, every package shipped, every import declared."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PY = tomllib.loads((ROOT / "pyproject.toml").read_text())
SHIPPED = ("formats", "zipmoe", "zipmoe_cli", "zipmoe_pack", "zipmoe_run")
IMPORT_TO_DIST = {"yaml": "pyyaml", "llama_cpp": "llama-cpp-python"}  # import name -> distribution name where they differ


def _dist(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _third_party_imports(package: str, skip: str | None = None) -> dict[str, str]:
    """Top-level third-party modules imported anywhere in ``package`` (lazy imports included) -> a file."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if skip and rel.startswith(skip):
            continue
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top not in SHIPPED:
                    found.setdefault(top, rel)
    return found


def test_license_is_an_spdx_string():
    assert PY["project"]["license"] == "Apache-2.0"  # the table form is deprecated (setuptools warns)
    req = PY["build-system"]["requires"]
    assert any(_dist(r) == "setuptools" and "77" in r for r in req), req  # SPDX strings need setuptools>=77


def test_every_package_is_shipped():
    from setuptools import find_packages

    found = find_packages(str(ROOT), include=PY["tool"]["setuptools"]["packages"]["find"]["include"])
    for pkg in SHIPPED:
        assert pkg in found, (pkg, found)
    on_disk = {p.parent.relative_to(ROOT).as_posix().replace("/", ".")
               for pkg in SHIPPED for p in (ROOT / pkg).rglob("__init__.py")}
    assert on_disk <= set(found), on_disk - set(found)
    assert not [p for p in found if p.split(".")[0] in ("tests", "scripts")]


def test_every_runtime_import_is_declared():
    declared = {_dist(r) for r in PY["project"]["dependencies"]}
    bench = declared | {_dist(r) for x in ("bench", "llamacpp") for r in PY["project"]["optional-dependencies"][x]}
    serve = declared | {_dist(r) for r in PY["project"]["optional-dependencies"]["serve"]}
    for pkg in SHIPPED:
        for mod, where in _third_party_imports(pkg, skip="zipmoe/bench/").items():
            ok = serve if where.startswith("zipmoe_run/serve/") else declared  # `zipmoe serve`: the serve extra
            assert IMPORT_TO_DIST.get(mod, mod).lower() in ok, f"{where} imports {mod}: not in dependencies"
    for mod, where in _third_party_imports("zipmoe/bench").items():
        assert IMPORT_TO_DIST.get(mod, mod).lower() in bench, f"{where} imports {mod}: not in dependencies or [bench]"


def test_entry_points_exist():
    import importlib

    for name, target in PY["project"]["scripts"].items():
        mod, func = target.split(":")
        assert callable(getattr(importlib.import_module(mod), func)), name
