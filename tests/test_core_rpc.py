"""The guard's registration: every RPC of every served service declares who may call it (the
method names come from the service descriptors), and a method without a declaration stops
the start instead of running unauthenticated."""

from __future__ import annotations

from typing import Any

import pytest

from session_audit.core.auth import READERS, WRITERS
from session_audit.core.rpc import Guard, access_of
from session_audit.server import SERVICES
from session_audit.sessions.service import SessionService


def test_every_served_method_declares_its_roles() -> None:
    guard = Guard(app=None)  # type: ignore[arg-type]  # registration reads no app
    for service, _, factory in SERVICES:
        cls: Any = factory  # the servicer class
        guard.register(service, cls.__new__(cls))
        for m in service.methods:
            access = access_of(getattr(cls, m.name))
            assert access is not None and access.roles, m.full_name
    # The REST twin carries the same declaration as the plain RPC it calls.
    assert access_of(SessionService.IngestSessionsJson) == access_of(SessionService.IngestSessions)
    assert access_of(SessionService.IngestSessions).roles == WRITERS  # type: ignore[union-attr]
    assert access_of(SessionService.ListSessions).roles == READERS  # type: ignore[union-attr]


def test_a_method_without_a_declaration_stops_the_start() -> None:
    class Forgetful(SessionService):
        async def GetSession(self, request: Any, context: Any) -> Any:  # no @roles
            raise AssertionError("never called")

    service = next(s for s, _, f in SERVICES if f is SessionService)
    with pytest.raises(TypeError, match=r"^Forgetful\.GetSession: declare who may call it"):
        Guard(app=None).register(service, Forgetful.__new__(Forgetful))  # type: ignore[arg-type]
