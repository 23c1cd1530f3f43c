"""require_admin: the bearer key, and the loopback-only rule behind (trusted and untrusted) reverse proxies.

A small FastAPI app with one admin route; the TCP peer is set with TestClient's ``client=``.
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.config import Settings
from app.deps import AdminDep, admin_refusal, get_settings, is_loopback
from app.errors import install_error_handlers
from app.main import create_app

KEY = "s3cret"
LOOPBACK = ("127.0.0.1", 5000)
REMOTE = ("203.0.113.7", 5000)
PROXY = ("10.0.0.5", 443)  # a reverse proxy on another host


def make_app(**settings) -> FastAPI:
    s = Settings(**settings)
    app = FastAPI()
    install_error_handlers(app)
    app.dependency_overrides[get_settings] = lambda: s

    @app.post("/admin", dependencies=[AdminDep])
    async def admin() -> dict:
        return {"ok": True}

    return app


def call(app: FastAPI, peer: tuple[str, int], headers: dict | None = None):
    with TestClient(app, client=peer) as c:
        return c.post("/admin", headers=headers or {})


def assert_forbidden(r, *words: str) -> None:
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == "forbidden" and err["type"] == "ForbiddenError"
    for w in words:
        assert w in err["message"], err["message"]


# --- no admin key: loopback only -------------------------------------------------


@pytest.mark.parametrize("peer", [LOOPBACK, ("::1", 5000), ("127.0.0.2", 1)])
def test_loopback_without_headers_allowed(peer):
    r = call(make_app(), peer)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Forwarded-For": "198.51.100.9"},
        {"X-Forwarded-For": "127.0.0.1"},  # even a loopback claim: the peer is not a trusted proxy
        {"Forwarded": "for=198.51.100.9;proto=https"},
        {"X-Real-IP": "198.51.100.9"},
    ],
)
def test_loopback_peer_with_proxy_header_refused(headers):
    # a reverse proxy on the same host, not listed in trusted_proxies: every remote client looks like loopback
    assert_forbidden(call(make_app(), LOOPBACK, headers), "proxy", next(iter(headers)))


def test_remote_peer_refused():
    assert_forbidden(call(make_app(), REMOTE), "203.0.113.7", "not on loopback", "STANCESERVE_ADMIN_KEY")


def test_trusted_proxy_forwarding_loopback_client_allowed():
    app = make_app(trusted_proxies=["127.0.0.1"])
    assert call(app, LOOPBACK, {"X-Forwarded-For": "127.0.0.1"}).status_code == 200
    assert call(app, LOOPBACK, {"Forwarded": 'for="[::1]:1234"'}).status_code == 200
    # the loopback peer itself, no proxy headers: a direct local client
    assert call(app, LOOPBACK).status_code == 200
    # a trusted proxy on another host that names a loopback client (the proxy's own view of the client)
    app = make_app(trusted_proxies=["10.0.0.0/24"])
    assert call(app, PROXY, {"X-Forwarded-For": "127.0.0.1"}).status_code == 200


def test_trusted_proxy_forwarding_remote_client_refused():
    app = make_app(trusted_proxies=["127.0.0.1"])
    assert_forbidden(call(app, LOOPBACK, {"X-Forwarded-For": "198.51.100.9"}), "198.51.100.9", "X-Forwarded-For")
    assert_forbidden(call(app, LOOPBACK, {"Forwarded": "for=198.51.100.9"}), "198.51.100.9", "Forwarded")
    assert_forbidden(call(app, LOOPBACK, {"Forwarded": "for=unknown"}), "no usable client address")


def test_trusted_proxy_uses_rightmost_untrusted_hop():
    app = make_app(trusted_proxies=["127.0.0.1", "10.0.0.0/24"])
    # the client wrote "127.0.0.1" itself; the proxy appended the real address
    assert_forbidden(call(app, LOOPBACK, {"X-Forwarded-For": "127.0.0.1, 198.51.100.9"}), "198.51.100.9")
    # two trusted hops after the client: skipped
    assert_forbidden(call(app, LOOPBACK, {"X-Forwarded-For": "198.51.100.9, 10.0.0.7"}), "198.51.100.9")
    # several header lines are one list
    r = call(app, LOOPBACK, [("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-For", "198.51.100.9")])
    assert_forbidden(r, "198.51.100.9")
    # every hop trusted: the leftmost is the client
    assert call(app, LOOPBACK, {"X-Forwarded-For": "127.0.0.1, 10.0.0.7"}).status_code == 200


def test_trusted_proxy_every_header_must_agree():
    app = make_app(trusted_proxies=["127.0.0.1"])
    # the proxy sets X-Forwarded-For; a spoofed Forwarded from the client cannot grant access, and vice versa
    r = call(app, LOOPBACK, {"X-Forwarded-For": "198.51.100.9", "Forwarded": "for=127.0.0.1"})
    assert_forbidden(r, "198.51.100.9")
    r = call(app, LOOPBACK, {"X-Forwarded-For": "127.0.0.1", "Forwarded": "for=198.51.100.9"})
    assert_forbidden(r, "198.51.100.9")


def test_trusted_proxy_without_client_address_refused():
    app = make_app(trusted_proxies=["10.0.0.0/24", "127.0.0.1"])
    assert_forbidden(call(app, PROXY), "10.0.0.5", "not on loopback")
    # X-Real-IP alone never grants access
    assert_forbidden(call(app, LOOPBACK, {"X-Real-IP": "127.0.0.1"}), "sent no X-Forwarded-For or Forwarded")


def test_untrusted_proxy_is_not_believed():
    app = make_app(trusted_proxies=["10.0.0.0/24"])
    assert_forbidden(call(app, REMOTE, {"X-Forwarded-For": "127.0.0.1"}), "proxy", "not in trusted_proxies")


# --- admin key set ------------------------------------------------------------------


def test_key_wrong_or_missing_is_401():
    app = make_app(admin_key=KEY)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}):
        r = call(app, LOOPBACK, headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"


def test_right_key_allowed_from_anywhere():
    app = make_app(admin_key=KEY)
    for peer in (REMOTE, LOOPBACK, PROXY):
        assert call(app, peer, {"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert call(app, REMOTE, {"Authorization": f"bearer {KEY}", "X-Forwarded-For": "198.51.100.9"}).status_code == 200


# --- helpers, settings, schema ------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True), ("localhost", True),
     ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("testclient", False), (None, False), ("", False)],
)
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


def test_trusted_proxies_setting(monkeypatch):
    monkeypatch.setenv("STANCESERVE_TRUSTED_PROXIES", '["127.0.0.1", "10.0.0.0/8"]')
    assert Settings().trusted_proxies == ["127.0.0.1/32", "10.0.0.0/8"]
    monkeypatch.delenv("STANCESERVE_TRUSTED_PROXIES")
    assert Settings().trusted_proxies == []
    with pytest.raises(ValueError):
        Settings(trusted_proxies=["not-an-ip"])


def test_admin_refusal_without_client():
    class NoClient:
        client = None
        headers = {}

    assert "(unknown) is not on loopback" in admin_refusal(NoClient())  # type: ignore[arg-type]


def test_openapi_shows_bearer_scheme():
    schema = create_app(Settings(admin_key=KEY)).openapi()
    scheme = schema["components"]["securitySchemes"]["AdminKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert schema["paths"]["/v1/adapters"]["post"]["security"] == [{"AdminKey": []}]
    assert "security" not in schema["paths"]["/v1/adapters"]["get"]
