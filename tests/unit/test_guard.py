"""Who may call, through the ASGI app with a fake engine: Host, Origin/CORS, Content-Type, keys."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from mlxd.app import create_app
from mlxd.config import ConfigError, parse_models
from mlxd.guard import check_exposure, is_loopback, split_host
from mlxd.settings import Settings, read_key_file
from tests.fakes import FakeEngine

pytestmark = pytest.mark.anyio

Client = Callable[..., httpx.AsyncClient]
CHAT = {"model": "a", "messages": [{"role": "user", "content": "Hi"}]}


def error_of(r: httpx.Response) -> dict[str, object]:
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, object] = body["error"]
    return error


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8080", "localhost:8080", "[::1]:8080", "app.localhost", "10.1.2.3:80"]
)
async def test_loopback_names_and_ip_literals_pass(make_client: Client, host: str) -> None:
    client = make_client(FakeEngine())
    r = await client.post("/v1/chat/completions", json=CHAT, headers={"host": host})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.nip.io"])
async def test_foreign_host_is_refused(make_client: Client, host: str) -> None:
    """DNS rebinding: a page's own name re-pointed at 127.0.0.1 arrives as its Host."""
    engine = FakeEngine()
    client = make_client(engine)
    r = await client.post("/v1/chat/completions", json=CHAT, headers={"host": host})
    assert r.status_code == 403
    assert error_of(r)["param"] == "Host"
    assert not engine.requests


async def test_allowed_hosts_extend_the_list(make_client: Client) -> None:
    client = make_client(FakeEngine(), settings={"allowed_hosts": ("mlxd.lan",)})
    r = await client.get("/v1/models", headers={"host": "mlxd.lan:8080"})
    assert r.status_code == 200


async def test_cross_origin_simple_post_is_refused(make_client: Client) -> None:
    """A page's text/plain POST needs no preflight; it must still never run."""
    engine = FakeEngine()
    client = make_client(engine)
    r = await client.post(
        "/v1/chat/completions",
        content=json.dumps(CHAT),
        headers={"origin": "https://evil.example", "content-type": "text/plain"},
    )
    assert r.status_code == 403
    assert error_of(r)["param"] == "Origin"
    assert "access-control-allow-origin" not in r.headers
    assert not engine.requests


async def test_same_origin_passes(make_client: Client) -> None:
    client = make_client(FakeEngine())
    r = await client.post(
        "/v1/chat/completions", json=CHAT, headers={"origin": "http://127.0.0.1:8080"}
    )
    assert r.status_code == 200


async def test_cors_preflight_and_response_for_allowed_origin(make_client: Client) -> None:
    client = make_client(FakeEngine(), settings={"cors_origins": ("https://app.example",)})
    pre = await client.options(
        "/v1/chat/completions",
        headers={
            "origin": "https://app.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization",
        },
    )
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"]
    r = await client.post(
        "/v1/chat/completions", json=CHAT, headers={"origin": "https://app.example"}
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert r.headers["vary"] == "Origin"
    other = await client.options(
        "/v1/chat/completions",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert other.status_code == 403
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
async def test_json_routes_need_json(make_client: Client, content_type: str | None) -> None:
    client = make_client(FakeEngine())
    headers = {"content-type": content_type} if content_type else {}
    r = await client.post("/v1/chat/completions", content=json.dumps(CHAT), headers=headers)
    assert r.status_code == 415
    assert error_of(r)["param"] == "Content-Type"


async def test_json_with_charset_passes(make_client: Client) -> None:
    client = make_client(FakeEngine())
    r = await client.post(
        "/v1/chat/completions",
        content=json.dumps(CHAT),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 200


async def test_api_keys(make_client: Client) -> None:
    engine = FakeEngine()
    client = make_client(engine, settings={"api_keys": ("k-one", "k-two")})
    missing = await client.post("/v1/chat/completions", json=CHAT)
    assert missing.status_code == 401
    assert error_of(missing)["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = await client.post(
        "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer k-three"}
    )
    assert wrong.status_code == 401
    assert "Incorrect API key" in str(error_of(wrong)["message"])
    assert (await client.get("/v1/models")).status_code == 401
    assert not engine.requests
    bearer = await client.post(
        "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer k-two"}
    )
    assert bearer.status_code == 200
    x_key = await client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": "k-one"})
    assert x_key.status_code == 200
    assert (await client.get("/health")).status_code == 200  # liveness probes carry no key


async def test_key_is_checked_before_content_type(make_client: Client) -> None:
    """An unauthenticated caller learns nothing about the request it would have to send."""
    client = make_client(FakeEngine(), settings={"api_keys": ("k",)})
    r = await client.post("/v1/chat/completions", content=b"x", headers={"content-type": "a/b"})
    assert r.status_code == 401


async def test_browser_may_not_unload_without_a_key(make_client: Client) -> None:
    engine = FakeEngine()
    client = make_client(engine, settings={"cors_origins": ("https://app.example",)})
    body = {**CHAT, "keep_alive": 0}
    page = await client.post(
        "/v1/chat/completions", json=body, headers={"origin": "https://app.example"}
    )
    assert page.status_code == 403
    assert error_of(page)["param"] == "keep_alive"
    local = await client.post("/v1/chat/completions", json=body)  # a local program, no Origin
    assert local.status_code == 200


async def test_browser_may_not_start_a_download(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    models = parse_models(
        {
            "default": "alpha",
            "models": [
                {"id": "alpha", "source": {"path": str(tiny_dirs["alpha"])}},
                {"id": "remote", "source": {"hf": "someone/some-model"}},
            ],
        },
        "test",
    )
    settings = Settings(
        home=tmp_path / "home",
        config_path=tmp_path / "models.yaml",
        cors_origins=("https://app.example",),
    )
    app = create_app(settings, engine_factory=lambda _: FakeEngine(), models=models)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
        r = await client.post(
            "/v1/chat/completions",
            json={**CHAT, "model": "remote"},
            headers={"origin": "https://app.example"},
        )
    assert r.status_code == 403
    assert error_of(r)["param"] == "model"


def test_non_loopback_bind_needs_a_key(tmp_path: Path) -> None:
    base = {"home": tmp_path, "config_path": tmp_path / "models.yaml"}
    with pytest.raises(ConfigError, match="without an API key"):
        check_exposure(Settings(host="0.0.0.0", **base))  # type: ignore[arg-type]
    check_exposure(Settings(host="0.0.0.0", api_keys=("k",), **base))  # type: ignore[arg-type]
    check_exposure(Settings(host="0.0.0.0", insecure_no_auth=True, **base))  # type: ignore[arg-type]
    check_exposure(Settings(host="::1", **base))  # type: ignore[arg-type]


def test_key_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team keys\nk-one\n\n  k-two  \n")
    assert read_key_file(path) == ("k-one", "k-two")
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no key"):
        read_key_file(path)


def test_env_and_file_keys_combine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys"
    path.write_text("k-file\n")
    monkeypatch.setenv("MLXD_API_KEY", "k-env1, k-env2")
    settings = Settings.from_env(api_key_file=str(path))
    assert settings.api_keys == ("k-env1", "k-env2", "k-file")


@pytest.mark.parametrize(
    ("value", "host"),
    [("a.b:80", "a.b"), ("[::1]:8080", "[::1]"), ("[::1]", "[::1]"), ("::1", "::1"), ("x", "x")],
)
def test_split_host(value: str, host: str) -> None:
    assert split_host(value) == host


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.2") and is_loopback("[::1]") and is_loopback("LOCALHOST")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
