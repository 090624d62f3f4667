"""REST responses validated against the published OpenAPI description of the gateway, and
grpcurl list/describe/call over reflection."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.factories import T0, Spec, minutes
from tests.support import Stack

# The published description, vendored so the test runs wherever the checkout is (CI clones it
# alone); `shared/contracts/` beside the checkout, when present, must hold the same document.
SPEC_NAME = "hoop-openapi-sessions-subset.json"
SPEC_FILE = Path(__file__).resolve().parent / "contracts" / SPEC_NAME
PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "contracts" / SPEC_NAME


def _spec() -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(SPEC_FILE.read_text())
    return spec


def test_the_vendored_contract_is_the_published_one() -> None:
    if not PUBLISHED.exists():
        pytest.skip(f"{PUBLISHED} not present beside the checkout; the vendored copy is used")
    assert json.loads(PUBLISHED.read_text()) == _spec()


def _openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI 3.0 `nullable: true` → JSON Schema `type: [T, "null"]`; refs kept."""
    if isinstance(node, dict):
        out = {k: _openapi_to_jsonschema(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable") and "type" in node:
            out["type"] = [node["type"], "null"]
        return out
    if isinstance(node, list):
        return [_openapi_to_jsonschema(v) for v in node]
    return node


def validator(schema_name: str) -> jsonschema.Draft7Validator:
    spec = _openapi_to_jsonschema(_spec())
    root = {"components": spec["components"], "$ref": f"#/components/schemas/{schema_name}"}
    return jsonschema.Draft7Validator(root)


@pytest.fixture(scope="module")
def filled(stack: Stack) -> tuple[str, list[Spec]]:
    org = stack.new_org("contract")
    token = stack.token(org, "admin")
    specs = [
        Spec(start=T0, end=T0 + minutes(5), review_status="APPROVED", approvers=("a@b.example",),
             jira="SEC-9", correlation_id="c-1", script="SELECT 1",
             redactions=(("EMAIL_ADDRESS", 1, 10), ("PHONE_NUMBER", 2, 20))),
        Spec(start=T0 + minutes(1), verb="connect", type="custom", subtype="ssh"),
    ]  # fmt: skip
    stack.ingest(token, [s.to_proto() for s in specs])
    return token, specs


def test_list_response_matches_contract(stack: Stack, filled: tuple[str, list[Spec]]) -> None:
    token, _ = filled
    v = validator("openapi.SessionList")
    for params in ({}, {"count": "none"}, {"count": "exact"}, {"limit": 1}):
        body = stack.rest("GET", "/api/sessions", token, params=params).json()
        errors = [e.message for e in v.iter_errors(body)]
        assert errors == [], errors
    assert (
        stack.rest("GET", "/api/sessions", token, params={"count": "none"}).json()["total"] is None
    )


def test_get_response_matches_session_schema(stack: Stack, filled: tuple[str, list[Spec]]) -> None:
    token, specs = filled
    v = validator("openapi.Session")
    for s in specs:
        body = stack.rest("GET", f"/api/sessions/{s.id}", token).json()
        assert [e.message for e in v.iter_errors(body)] == []


def test_error_body_matches_contract(stack: Stack, filled: tuple[str, list[Spec]]) -> None:
    token, _ = filled
    v = validator("openapi.HTTPError")
    body = stack.rest("GET", "/api/sessions", token, params={"limit": 0}).json()
    assert [e.message for e in v.iter_errors(body)] == []


def test_every_documented_query_parameter_is_accepted(
    stack: Stack, filled: tuple[str, list[Spec]]
) -> None:
    token, _ = filled
    examples = {"start_date": "2026-01-01T00:00:00Z", "end_date": "2027-01-01T00:00:00Z",
                "limit": "5", "offset": "0", "count": "capped", "review.status": "APPROVED"}  # fmt: skip
    for p in _spec()["paths"]["/sessions"]["get"]["parameters"]:
        value = examples.get(p["name"], "x")
        r = stack.rest("GET", "/api/sessions", token, params={p["name"]: value})
        assert r.status_code == 200, (p["name"], r.text)


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "grpcurl")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)


def test_grpcurl_list_describe_and_call(stack: Stack, filled: tuple[str, list[Spec]]) -> None:
    token, specs = filled
    target = stack.grpc_target
    listed = grpcurl("-plaintext", target, "list")
    assert listed.returncode == 0, listed.stderr
    assert "session_audit.v1.SessionService" in listed.stdout.split()
    assert "grpc.health.v1.Health" in listed.stdout.split()
    described = grpcurl("-plaintext", target, "describe", "session_audit.v1.SessionService")
    assert "rpc ListSessions" in described.stdout and "/api/sessions" in described.stdout
    message = grpcurl("-plaintext", target, "describe", "session_audit.v1.Session")
    assert "redactions" in message.stdout
    called = grpcurl(
        "-plaintext", "-H", f"authorization: Bearer {token}", "-d", json.dumps({"id": specs[0].id}),
        target, "session_audit.v1.SessionService/GetSession",
    )  # fmt: skip
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["id"] == specs[0].id
    denied = grpcurl(
        "-plaintext", "-d", json.dumps({"id": str(uuid.uuid4())}), target,
        "session_audit.v1.SessionService/GetSession",
    )  # fmt: skip
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr
    health = grpcurl("-plaintext", target, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout) == {"status": "SERVING"}
