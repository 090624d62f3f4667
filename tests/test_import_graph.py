"""The import rule of docs/architecture.md, read from the source with `ast`: core imports no
domain; a domain imports core and itself, and another domain only through the allowed doors
(today: sessions.ingest keeps analytics.rollups current); the process edges (cli, server, …)
may import anything."""

from __future__ import annotations

import ast
from pathlib import Path

import session_audit

ROOT = Path(session_audit.__file__).parent
DOMAINS = ("sessions", "analytics", "reports")
# (importing domain, imported module): the only arrows between domains.
DOORS = {("sessions", "session_audit.analytics.rollups")}


def imports(path: Path) -> set[str]:
    """Every session_audit module `path` imports (absolute names)."""
    out: set[str] = set()
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from session_audit.analytics import rollups` imports the module rollups;
            # `from session_audit.core.sql import Where` the module sql.
            for a in node.names:
                name = f"{base}.{a.name}"
                out.add(name if is_module(name) else base)
    return {m for m in out if m.startswith("session_audit")}


def is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def arrows() -> list[tuple[str, str, str]]:
    """(file, its room, imported module) for every import inside the package."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent)
        mine = rel.parts[1] if len(rel.parts) > 2 else ""
        out += [(str(rel), mine, m) for m in imports(path)]
    return out


def test_core_imports_no_domain() -> None:
    wrong = [(f, m) for f, mine, m in arrows() if mine == "core" and room(m) in DOMAINS]
    assert wrong == []


def test_domains_meet_only_through_their_doors() -> None:
    wrong = []
    for f, mine, m in arrows():
        other = room(m)
        if mine in DOMAINS and other in DOMAINS and other != mine:
            if (mine, m) not in DOORS:
                wrong.append((f, m))
    assert wrong == []


def test_the_rule_sees_arrows() -> None:
    """The reader finds the imports it judges (a rule over nothing passes vacuously)."""
    found = {(mine, m) for _, mine, m in arrows()}
    assert ("sessions", "session_audit.analytics.rollups") in found
    assert ("reports", "session_audit.core.sql") in found
    assert ("core", "session_audit.core.errors") in found
