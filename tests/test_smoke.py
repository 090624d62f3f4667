from __future__ import annotations

from tests.support import Stack


def test_rest_requires_token(stack: Stack) -> None:
    r = stack.rest("GET", "/api/sessions")
    assert r.status_code == 401
    assert r.json() == {"message": r.json()["message"]}
    assert "authorization" in r.json()["message"]
