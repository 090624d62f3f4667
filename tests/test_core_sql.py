"""The SQL fragment builder: parameters are numbered where they land in the final text (never
by the order of calls), a slot named twice binds one parameter, request values never reach
the text, and positional markers written by hand are refused."""

from __future__ import annotations

import pytest

from session_audit.core.sql import Sql, Template, Where, join, param, q

SELECT = Template("SELECT $cols FROM t WHERE $where AND owner = $owner LIMIT $limit")


def test_parameters_are_numbered_in_the_order_they_appear() -> None:
    # The WHERE is built first and the owner last, but LIMIT's value is written last.
    where = Where().add("a = $v", v="x").add("b = any($v::int[])", v=[1, 2])
    stmt = SELECT(limit=10, cols=Sql("a, b"), owner="o'; DROP TABLE t; --", where=where.sql())
    assert stmt.render() == (
        "SELECT a, b FROM t WHERE (a = $1) AND (b = any($2::int[])) AND owner = $3 LIMIT $4",
        ["x", [1, 2], "o'; DROP TABLE t; --", 10],
    )


def test_a_fragment_used_twice_is_one_parameter() -> None:
    at = param("2026-01-01")
    stmt = q("x >= $at AND (y IS NULL OR y >= $at) AND z < $lim", at=at, lim=5)
    assert stmt.render() == ("x >= $1 AND (y IS NULL OR y >= $1) AND z < $2", ["2026-01-01", 5])
    both = join(" OR ", [q("a = $v", v=at), q("b = $v", v=at)])
    assert both.render() == ("a = $1 OR b = $1", ["2026-01-01"])


def test_the_same_fragment_renders_alone_and_inside_another() -> None:
    matching = Where().add("org = $org", org=7).sql()
    page = Template("SELECT * FROM t WHERE $w ORDER BY id LIMIT $n")(w=matching, n=21)
    count = Template("SELECT count(*) FROM t WHERE $w")(w=matching)
    assert page.render() == ("SELECT * FROM t WHERE (org = $1) ORDER BY id LIMIT $2", [7, 21])
    assert count.render() == ("SELECT count(*) FROM t WHERE (org = $1)", [7])


def test_an_empty_where_is_true_and_text_concatenates() -> None:
    assert Where().sql().render() == ("TRUE", [])
    assert ("NOT (" + q("a = $v", v=1) + ")").render() == ("NOT (a = $1)", [1])


@pytest.mark.parametrize("text", ["a = $1", "SELECT $2::int"])
def test_hand_written_positions_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="positional parameter"):
        Template(text)
    with pytest.raises(ValueError, match="parameter marker"):
        Sql(text)


def test_slots_must_be_filled_exactly() -> None:
    with pytest.raises(TypeError, match=r"missing \['owner'\]"):
        SELECT(cols=Sql("a"), where=Sql("TRUE"), limit=1)
    with pytest.raises(TypeError, match=r"extra \['other'\]"):
        q("a = $v", v=1, other=2)
