"""The rollup definitions have one source, rollups.py: the DELETE and TRUNCATE triggers of
migration 0010 (which take deleted sessions out of the rollups) are checked against it here, so
a dimension, grain, condition or measure added on one side only fails this test. (What the
trigger computes is compared with a rebuild from rollups.py's definitions on real rows in
test_analytics_properties.py::test_rollups_equal_a_rebuild_after_ingest_updates_and_deletes.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import session_audit.core.migrations
from session_audit.analytics import rollups

MIGRATION = Path(session_audit.core.migrations.__file__).parent / "0010_analytics_rollups.sql"


def normal(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()


def _function(name: str) -> str:
    text = MIGRATION.read_text()
    m = re.search(rf"CREATE FUNCTION {name}\(\).*?\$\$(.*?)\$\$", text, re.DOTALL)
    assert m is not None, f"{name} not found in {MIGRATION.name}"
    return normal(m.group(1))


def _inserts() -> dict[str, str]:
    """The trigger's statements by the rollup table they write."""
    body = _function("rollups_forget_deleted")
    out: dict[str, str] = {}
    for part in body.split("INSERT INTO ")[1:]:
        table = part.split(" ", 1)[0]
        assert table not in out, f"two statements write {table}"
        out[table] = part
    return out


def on_deleted(expr: str) -> str:
    """A rollups.py expression over the session `s`, as the trigger writes it over `d`."""
    return re.sub(r"\bs\.", "d.", expr)


def test_the_trigger_writes_every_rollup_table_and_only_those() -> None:
    assert set(_inserts()) == {f.table for f in rollups.FAMILIES}
    truncated = _function("rollups_forget_all")
    m = re.search(r"TRUNCATE (.*?);", truncated)
    assert m is not None
    assert {t.strip() for t in m.group(1).split(",")} == {f.table for f in rollups.FAMILIES}


@pytest.mark.parametrize("family", rollups.FAMILIES, ids=lambda f: f.table)
def test_the_trigger_uses_the_python_definition(family: rollups.Family) -> None:
    stmt = _inserts()[family.table]
    select, _, rest = stmt.partition(" FROM deleted d ")
    # The key: org, grain, bucket, then the dimensions in rollups.py's order.
    columns = [c.strip() for c in re.split(r",(?![^(]*\))", select.split("SELECT ", 1)[1])]
    dims = columns[3 : 3 + len(family.dims)]
    assert dims == [on_deleted(e) for _, e in family.dims]
    assert len(columns) == len(family.columns)
    # The grains kept, in the same VALUES list rollups.py builds.
    assert normal(rollups.grains_sql(family.grains)) in rest
    # The same rows count (e.g. only sessions with an end, only array redactions).
    where = rest.split(" WHERE ", 1)[1].split(" GROUP BY ", 1)[0]
    assert where == on_deleted(family.where)
    # Grouped by the whole key, and each measure added on conflict.
    key_positions = ", ".join(str(i) for i in range(1, len(family.key) + 1))
    assert f"GROUP BY {key_positions} ORDER BY {key_positions}" in rest
    assert f"ON CONFLICT ON CONSTRAINT {family.table}_pkey DO UPDATE" in rest
    sets = rest.split(" DO UPDATE SET ", 1)[1].rstrip(";").split(";", 1)[0]
    assert [s.strip() for s in sets.split(",")] == [
        f"{c} = r.{c} + EXCLUDED.{c}" for c, _ in family.measures
    ]
