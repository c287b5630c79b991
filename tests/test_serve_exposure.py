"""Other web sites cannot drive the server: a cross-site `text/plain` POST (which browsers send
without asking), a JSON POST from another origin and a DNS-rebound Host are refused before any
generation; only `--cors-origin` origins get CORS headers; Host names are checked against the
bound address and `--allowed-hosts`; the key can come from a file or the environment, and
binding to the network without a key warns. Real SmolLM2 behind the real uvicorn."""

from __future__ import annotations

import http.client
import json

import pytest

from llamaworks import LLM
from llamaworks.cli import build_parser
from llamaworks.errors import LlamaworksError
from llamaworks.infer.continuous import ContinuousEngine
from llamaworks.serve import cli as serve_cli
from llamaworks.serve.app import create_app
from llamaworks.serve.background import BackgroundServer

pytestmark = pytest.mark.slow
MODEL, APP_ORIGIN = "smollm2", "http://app.example"
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                   "max_tokens": 1}).encode()


@pytest.fixture(scope="module")
def engine(smollm, smollm_tokenizer):
    engine = ContinuousEngine(LLM(smollm, smollm_tokenizer), max_batch=1, context=256)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    """The defaults: bound to loopback, no allow-list, no CORS origin."""
    with BackgroundServer(create_app(engine, MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def configured(engine):
    app = create_app(engine, MODEL, extra_hosts=["llm.example"], cors_origins=[APP_ORIGIN])
    with BackgroundServer(app) as url:
        yield url


def _conn(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    return http.client.HTTPConnection(host, int(port), timeout=60)


def _post(conn: http.client.HTTPConnection, headers: dict, body: bytes = CHAT,
          method: str = "POST", path: str = "/v1/chat/completions"
          ) -> tuple[int, dict, http.client.HTTPMessage]:
    conn.request(method, path, body if method == "POST" else None, headers)
    r = conn.getresponse()
    raw = r.read()
    return r.status, json.loads(raw) if raw.startswith(b"{") else {}, r.headers


def _error(body: dict) -> dict:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("headers, status, code", [
    ({"Content-Type": "text/plain", "Origin": "http://evil.example"}, 403, "origin_not_allowed"),
    ({"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ({}, 415, "unsupported_media_type"),  # a Blob body without a type: no Content-Type at all
    ({"Content-Type": "application/json", "Origin": "http://evil.example"}, 403,
     "origin_not_allowed"),
    ({"Content-Type": "application/json", "Origin": "null"}, 403, "origin_not_allowed"),
], ids=["text-plain-cross-site", "text-plain", "form", "no-type", "json-cross-site",
        "json-null-origin"])
def test_cross_site_and_non_json_posts_are_refused_without_generating(server, engine, headers,
                                                                      status, code):
    conn = _conn(server)
    admitted = engine.stats.requests
    got, body, _ = _post(conn, headers)
    sock = conn.sock
    assert got == status and _error(body)["code"] == code
    assert engine.stats.requests == admitted  # nothing was generated
    # the same connection goes on serving, e.g. the web chat (its fetch sends its own Origin)
    got, _, h = _post(conn, {"Content-Type": "application/json", "Origin": server})
    assert got == 200 and conn.sock is sock and "access-control-allow-origin" not in h


@pytest.mark.parametrize("method, path", [("POST", "/v1/chat/completions"),
                                          ("GET", "/v1/models"), ("GET", "/")])
def test_a_dns_rebound_host_is_refused(server, engine, method, path):
    port = server.rsplit(":", 1)[1]
    admitted = engine.stats.requests
    got, body, _ = _post(_conn(server), {"Host": f"evil.example:{port}",
                                         "Content-Type": "application/json"}, method=method,
                         path=path)
    assert got == 403 and _error(body)["code"] == "host_not_allowed"
    assert engine.stats.requests == admitted


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}",
                                  "LOCALHOST", "llm.example:443"])
def test_loopback_names_and_allowed_hosts_are_served(configured, host):
    port = configured.rsplit(":", 1)[1]
    got, _, _ = _post(_conn(configured), {"Host": host.format(port=port),
                                      "Content-Type": "application/json"})
    assert got == 200


def test_only_a_cors_origin_gets_cors_headers(configured, engine):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type,authorization"}
    got, _, headers = _post(_conn(configured), {**preflight, "Origin": APP_ORIGIN},
                            method="OPTIONS")
    assert got == 200 and headers["access-control-allow-origin"] == APP_ORIGIN
    got, _, headers = _post(_conn(configured), {"Content-Type": "application/json",
                                                "Origin": APP_ORIGIN})
    assert got == 200 and headers["access-control-allow-origin"] == APP_ORIGIN
    admitted = engine.stats.requests
    got, _, headers = _post(_conn(configured), {**preflight, "Origin": "http://evil.example"},
                            method="OPTIONS")
    assert got == 403 and "access-control-allow-origin" not in headers
    assert engine.stats.requests == admitted


def test_no_cors_headers_without_a_cors_origin(server):
    got, _, headers = _post(_conn(server), {"Access-Control-Request-Method": "POST",
                                            "Origin": APP_ORIGIN}, method="OPTIONS")
    assert got == 403 and "access-control-allow-origin" not in headers
    got, _, _ = _post(_conn(server), {"Content-Type": "application/json",
                                      "Host": "llm.example"})
    assert got == 403  # an allow-list is opt-in


def test_bound_to_every_interface_without_allow_list_any_host_is_served(engine):
    """The documented choice: the server cannot know the names it is reached by, so it warns
    (see the CLI test) instead of refusing them; cross-site POSTs are still refused."""
    with BackgroundServer(create_app(engine, MODEL, host="0.0.0.0")) as url:
        assert _post(_conn(url), {"Content-Type": "application/json",
                                  "Host": "box.lan:8000"})[0] == 200
        assert _post(_conn(url), {"Content-Type": "application/json", "Host": "box.lan:8000",
                                  "Origin": "http://evil.example"})[0] == 403
    with BackgroundServer(create_app(engine, MODEL, host="0.0.0.0",
                                     extra_hosts=["box.lan"])) as url:
        assert _post(_conn(url), {"Content-Type": "application/json",
                                  "Host": "box.lan:8000"})[0] == 200
        assert _post(_conn(url), {"Content-Type": "application/json",
                                  "Host": "evil.example"})[0] == 403


def _serve_args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(serve_cli.KEY_ENV, raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    assert serve_cli.api_key(_serve_args("--api-key-file", str(key_file))) == "s3cret"
    monkeypatch.setenv(serve_cli.KEY_ENV, "from-env")
    assert serve_cli.api_key(_serve_args()) == "from-env"
    assert serve_cli.api_key(_serve_args("--api-key", "given")) == "given"
    key_file.write_text("\n")
    for argv in (["--api-key-file", str(key_file)], ["--api-key-file", str(tmp_path / "none")],
                 ["--api-key", "a", "--api-key-file", str(key_file)]):
        with pytest.raises(LlamaworksError):
            serve_cli.api_key(_serve_args(*argv))


@pytest.mark.parametrize("argv, warned", [
    (["--host", "0.0.0.0"], ["no --api-key", "any Host header"]),
    (["--host", "0.0.0.0", "--allowed-hosts", "box.lan"], ["no --api-key"]),
    (["--host", "0.0.0.0", "--allowed-hosts", "box.lan", "--api-key", "k"], []),
    (["--host", "127.0.0.1"], []),
])
def test_serving_to_the_network_without_a_key_warns_at_start(engine, monkeypatch, capsys,
                                                             argv, warned):
    import uvicorn

    monkeypatch.delenv(serve_cli.KEY_ENV, raising=False)
    monkeypatch.setattr(serve_cli, "build_engine", lambda args: (engine, MODEL))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    monkeypatch.setattr(engine, "shutdown", lambda: None)  # the module's engine lives on
    args = _serve_args(*argv)
    assert args.fn(args) == 0
    err = capsys.readouterr().err
    assert [w for w in ["no --api-key", "any Host header"] if w in err] == warned
