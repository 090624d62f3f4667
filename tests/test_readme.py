"""The README's endpoint examples work as pasted: every ```sh block of its "Endpoints" section,
run in order through bash, the real curl and the real grpcurl against the test stack, with only
the token and the two addresses replaced. curl fails on an HTTP error status, so an example
answering 4xx/5xx fails the test; and every RPC of the contract appears in an example."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.api import annotations_pb2

from session_audit.v1 import analytics_pb2, reports_pb2, sessions_pb2
from tests.report_reference import RSpec
from tests.support import Stack

README = Path(__file__).resolve().parents[1] / "README.md"
TOKEN_LINE = "export TOKEN=sat_…"
ADDRESS_LINE = "API=http://127.0.0.1:8080 GRPC=127.0.0.1:50051"


def endpoint_examples() -> str:
    text = README.read_text()
    section = text[text.index("## Endpoints") : text.index("\n## ", text.index("## Endpoints"))]
    return "".join(re.findall(r"```sh\n(.*?)```", section, re.S))


def curl_calls(examples: str) -> list[tuple[str, str]]:
    """(HTTP method, path) of every curl example; `$VAR` path segments stay as written."""
    calls = []
    url = re.compile(r'"\$API(/[^"?]*)')
    for start in re.finditer(r"\bcurl ", examples):
        found = url.search(examples, start.end())
        assert found, examples[start.start() :]
        cmd = examples[start.end() : found.start()]
        verb = re.search(r"-X (\w+)", cmd)
        calls.append((verb[1] if verb else "POST" if " -d " in cmd else "GET", found[1]))
    return calls


def test_every_rpc_and_rest_path_has_an_example() -> None:
    examples = endpoint_examples()
    calls = curl_calls(examples)
    for module in (sessions_pb2, analytics_pb2, reports_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                rule = method.GetOptions().Extensions[annotations_pb2.http]
                if method.name.endswith("Json"):
                    # REST twins: called by Envoy for the curl example, named in its comment.
                    assert method.name in examples, method.full_name
                else:
                    assert f"{service.full_name}/{method.name}" in examples or (
                        # the four attribute RPCs are called in one loop
                        method.name.endswith("Attributes") and f" {method.name}" in examples
                    ), method.full_name
                verb = rule.WhichOneof("pattern")
                if verb is None:
                    continue
                template = getattr(rule, verb)
                pattern = re.sub(r"\\\{\w+\\\}", r"[^/]+", re.escape(template))
                assert any(
                    v == verb.upper() and re.fullmatch(pattern, path) for v, path in calls
                ), (verb, template)


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl binary on this machine")
def test_readme_examples_work_as_pasted(stack: Stack, tmp_path: Path) -> None:
    org = stack.new_org("readme")
    token = stack.token(org, "admin", "admin@readme.example")
    stack.ingest(token, [RSpec(protocol="ssh").to_proto(), RSpec(protocol="rdp").to_proto()])
    examples = endpoint_examples()
    assert TOKEN_LINE in examples and ADDRESS_LINE in examples
    script = examples.replace(TOKEN_LINE, f"export TOKEN={token}").replace(
        ADDRESS_LINE, f"API={stack.http} GRPC={stack.grpc_target}"
    )
    # The examples call .venv/bin/…: this checkout's venv, whichever directory they run in.
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    preamble = 'set -euo pipefail\ncurl() { command curl --fail-with-body "$@"; }\n'
    done = subprocess.run(
        ["bash", "-c", preamble + script], cwd=tmp_path, env=dict(os.environ),
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-4000:])
    out = done.stdout
    assert '"status": "SERVING"' in out
    # Ingest: REST stores the session, unary gRPC finds it unchanged, the stream's second
    # chunk ends it.
    assert '{"accepted":1,"written":1,"unchanged":0,"rejected":0,"rejections":[]}' in out
    assert '"accepted": 2,\n  "written": 1,\n  "unchanged": 1' in out
    # The report was generated and downloaded as CSV; every object created was deleted again.
    (csv,) = tmp_path.glob("*.csv")
    assert csv.read_text().startswith("server,")
    assert out.count('{"result":"success"}') == 4  # PATCH and three REST deletes
