"""The audit log against anything (issue 22, items 10 and 11), on a real Redis and the real
dashboard app:

 10. a write whose body spells a lone surrogate ("\\ud800") is refused and audited, and the
     listing keeps working; a property test (hypothesis) stores records made of arbitrary text
     -- lone surrogates included, which schemathesis cannot generate -- through the middleware's
     own write path and raw arbitrary bytes straight into the stream, and every page of
     GET /api/audit stays a 200 that parses;
 11. a write's audit entry is on the stream before its answer arrives: through a real HTTP
     server (uvicorn), each answer is followed at once by a read of the stream, while Redis
     holds writes back for a moment (CLIENT PAUSE WRITE) so an entry written after the answer
     would be missing."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetloop import config
from fleetloop.buffer.store import LocalStore
from fleetloop.dashboard.app import DashboardServer, build_app

from test_dashboard import OP, VIEW, tokens

pytestmark = pytest.mark.timeout(300)

SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
TEXT = st.text(st.one_of(st.characters(), SURROGATES), max_size=40)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                       max_leaves=20)


@pytest.fixture
def api(redis_client, tmp_path):
    app, dash = build_app(redis_client, LocalStore(tmp_path / "store"), tokens(), offline_after_s=1.0)
    with TestClient(app) as client:
        client.dash = dash
        yield client


def listing_ok(api, limit: int = 1000) -> list[dict]:
    r = api.get("/api/audit", headers=VIEW, params={"limit": limit})
    assert r.status_code == 200, r.text[:500]
    entries = r.json()["entries"]
    json.dumps(entries, ensure_ascii=False).encode("utf-8")  # what any client re-encodes
    return entries


@pytest.mark.parametrize("method,path,raw", [
    ("POST", "/api/fleet/pin", b'{"version": "\\ud800"}'),
    ("POST", "/api/robots/robot-1/takeover", b'{"reason": "\\ud800 and \\udfff\\ud800"}'),
    ("PUT", "/api/canary", b'{"version": "v000001", "robot_ids": ["\\udc80"], "\\ud800": 1}'),
    ("POST", "/api/rollout/reject", b'{"version": "v000001", "reason": "\\ud83d"}'),
])
def test_a_lone_surrogate_is_refused_audited_and_listed(api, method, path, raw):
    r = api.request(method, path, content=raw, headers={**OP, "content-type": "application/json"})
    assert r.status_code in (404, 409, 422), r.text
    entries = listing_ok(api)
    top = entries[0]
    assert (top["path"], top["who"], top["status"]) == (path, "alice", r.status_code)
    assert "\\ud" in json.dumps(top["params"]) or "\\\\ud" in json.dumps(top["params"])  # spelled out, visible


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(params=JSONISH, detail=TEXT, path=TEXT,
       raw=st.dictionaries(st.binary(min_size=1, max_size=12), st.binary(max_size=64), min_size=1, max_size=4))
def test_no_stored_byte_sequence_breaks_the_listing(api, redis_client, params, detail, path, raw):
    """Records as the middleware writes them (any JSON value, any text) and entries of arbitrary
    bytes as anyone with Redis access could write them: every listing is a 200 that parses."""
    api.dash.audit({"ts_ns": time.time_ns(), "who": detail, "method": "POST", "path": path, "action": detail,
                    "target": path, "params": params, "status": 422, "result": "error", "detail": detail})
    redis_client.xadd(config.AUDIT_STREAM, raw)
    body = json.dumps(params, ensure_ascii=True, allow_nan=True).encode()  # JSON's own \\udXXX escapes
    api.post("/api/robots/robot-1/takeover", content=body[:60_000], headers={**OP, "content-type": "application/json"})
    entries = listing_ok(api, limit=3)
    assert entries[0]["path"] == "/api/robots/robot-1/takeover" and entries[0]["who"] == "alice"
    assert {"id"} <= set(entries[1]) and entries[2]["status"] == 422
    page = api.get("/api/audit", headers=VIEW, params={"limit": 2, "before": entries[0]["id"]})
    assert page.status_code == 200 and len(page.json()["entries"]) == 2


def test_the_audit_entry_is_written_before_the_answer(redis_client, tmp_path):
    app, _dash = build_app(redis_client, LocalStore(tmp_path / "store"), tokens(), offline_after_s=1.0)
    admin = redis_client
    with DashboardServer(app) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        requests = []
        for i in range(40):
            kind = ("denied", "forbidden", "invalid", "handled")[i % 4]
            path = f"/api/robots/probe-{i}/takeover"
            headers = {"denied": {}, "forbidden": VIEW, "invalid": OP, "handled": OP}[kind]
            body = b"{not json" if kind == "invalid" else b"{}"
            requests.append((path, headers, body))
        missing = []
        for i, (path, headers, body) in enumerate(requests):
            if i % 2 == 0:  # hold Redis writes back briefly: an entry written after the answer is late
                admin.execute_command("CLIENT", "PAUSE", "150", "WRITE")
            r = http.post(path, content=body, headers={**headers, "content-type": "application/json"})
            top = admin.xrevrange(config.AUDIT_STREAM, count=1)  # reads are not paused
            if not top or top[0][1].get(b"path", b"").decode() != path:
                missing.append((path, r.status_code))
        assert missing == [], f"{len(missing)} of {len(requests)} answers arrived before their audit entry: {missing[:5]}"
        assert len(admin.xrange(config.AUDIT_STREAM)) == len(requests)
