"""Configuration from the environment: defaults, and a malformed value refused with the
variable's name and what was expected (the server does not start on it)."""

from __future__ import annotations

import pytest

from session_audit.core.config import Config, ConfigError


def test_gc_thresholds_default_and_override() -> None:
    assert Config.from_environ({}).gc_thresholds == (10_000, 20, 100)
    assert Config.from_environ({"GC_THRESHOLDS": "700,10,10"}).gc_thresholds == (700, 10, 10)
    assert Config.from_environ({"GC_THRESHOLDS": ""}).gc_thresholds == (10_000, 20, 100)


@pytest.mark.parametrize(
    "raw", ["10000", "10000,20", "1,2,3,4", "a,b,c", "0,10,10", "10000,0,100", "10000,20,10001",
            "2000000,10,10", "-1,10,10", "10000;20;100"],
)  # fmt: skip
def test_malformed_gc_thresholds_are_refused_by_name(raw: str) -> None:
    with pytest.raises(ConfigError) as err:
        Config.from_environ({"GC_THRESHOLDS": raw})
    assert str(err.value) == (
        "GC_THRESHOLDS: expected three integers as gen0,gen1,gen2 such as 10000,20,100 "
        f"(gen0 1..1000000, gen1 and gen2 1..10000), got {raw!r}"
    )


@pytest.mark.parametrize(("name", "raw", "message"), [
    ("WORKERS", "two", "WORKERS: expected an integer, got 'two'"),
    ("WORKERS", "65", "WORKERS: expected 1..64, got 65"),
    ("GRPC_PORT", "-1", "GRPC_PORT: expected 0..65535, got -1"),
])  # fmt: skip
def test_malformed_integers_are_refused_by_name(name: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Config.from_environ({name: raw})
    assert str(err.value) == message
