"""docs/architecture.md's module map matches the tree, both ways: every module is placed, and every
place names something that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("exporter", "podresources")
# Generated gRPC stubs live in api/ folders and are described by their protos, not by the map.
NOT_MAPPED = {"__init__"}


def module_rows() -> dict[str, str]:
    """First cell (the module path) -> second cell (the concern), for the module map table."""
    rows: dict[str, str] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`") and ("exporter" in cells[0] or "podresources" in cells[0]):
            rows[cells[0]] = cells[1]
    return rows


def tree() -> tuple[set[str], dict[str, set[str]]]:
    """(top-level module files, package dir -> its module names), relative to the repo root."""
    top: set[str] = set()
    packages: dict[str, set[str]] = {}
    for root in PACKAGES:
        base = ROOT / root
        for path in base.glob("*.py"):
            if path.stem not in NOT_MAPPED:
                top.add(f"{root}/{path.name}")
        for sub in base.iterdir():
            if sub.is_dir() and (sub / "__init__.py").exists() and sub.name != "api":
                packages[f"{root}/{sub.name}/"] = {p.stem for p in sub.glob("*.py") if p.stem not in NOT_MAPPED}
    # podresources is itself a package: its modules are listed in its own row
    packages["podresources/"] = {p.stem for p in (ROOT / "podresources").glob("*.py") if p.stem not in NOT_MAPPED}
    top = {t for t in top if not t.startswith("podresources/")}
    return top, packages


def test_every_module_is_on_the_map() -> None:
    rows = module_rows()
    named = {p for cell in rows for p in re.findall(r"`([^`]+)`", cell)}
    top, packages = tree()
    assert sorted(top - named) == [], "modules missing from docs/architecture.md's module map"
    for package, modules in packages.items():
        row = next((concern for cell, concern in rows.items() if f"`{package}`" in cell), None)
        assert row is not None, f"{package} has no row in docs/architecture.md"
        listed = set(re.findall(r"`(\w+)`", row))
        assert sorted(modules - listed) == [], f"{package} modules missing from its row"


def test_the_map_names_only_what_exists() -> None:
    rows = module_rows()
    top, packages = tree()
    for cell, concern in rows.items():
        for path in re.findall(r"`([^`]+)`", cell):
            assert path in top or path in packages, f"docs/architecture.md names {path}, which does not exist"
            if path in packages:
                modules = packages[path]
                # a module is named as "`name` (what it does)"
                listed = set(re.findall(r"`([a-z_]+)` \(", concern))
                unknown = sorted(n for n in listed if n not in modules)
                assert unknown == [], f"{path} row names modules that do not exist: {unknown}"
