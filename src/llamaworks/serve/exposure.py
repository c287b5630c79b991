"""Who may drive the server: the Host and Origin checks that keep other web sites (directly, or
through DNS rebinding) from using a server on this machine, and the start-up warnings.

A web page the user visits can send requests to `http://127.0.0.1:8000` without the user's
knowledge. The JSON-only rule (415, in `app`) stops the requests a browser sends without asking
first; this module refuses the rest:

- `Host` must name the server: its bound address, `localhost`/`127.0.0.1`/`::1` when bound to
  loopback or to every interface, or a name in `--allowed-hosts` (`*`: any). A page on
  `evil.example` whose name was re-pointed at 127.0.0.1 still sends `Host: evil.example`.
  Bound to `0.0.0.0`/`::` without an allow-list, any Host is accepted (the server cannot know
  the names it is reached by) and `warnings` says so.
- `Origin`, when a browser sends one, must be the server's own (its scheme-less `host:port`
  equal to `Host`) or one listed with `--cors-origin`; only those get CORS headers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from llamaworks.serve.schemas import APIError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def host_name(value: str) -> str | None:
    """The lower-case host of a `Host` header or allow-list entry (`name`, `name:port`,
    `[v6]:port`), or None when there is none."""
    try:
        return urlsplit("//" + value.strip()).hostname
    except ValueError:
        return None


def _bind_name(bind: str) -> str:
    """The bound address as a host name: IPv6 literals come bare (`::1`) or bracketed."""
    return bind.strip("[]").lower() if ":" in bind else (host_name(bind) or "")


def is_loopback(bind: str) -> bool:
    """Whether the bound address is reachable from this machine only."""
    name = _bind_name(bind)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str, extra: Collection[str] = ()) -> frozenset[str] | None:
    """The Host names a server bound to `bind` answers to; None when any is accepted (bound to
    every interface without an allow-list, or `*` in it)."""
    listed = {n for n in map(host_name, extra) if n}
    if "*" in extra or (bind in WILDCARDS and not listed):
        return None
    names = set(listed)
    if bind in WILDCARDS or is_loopback(bind):
        names |= LOOPBACK_NAMES
    if bind not in WILDCARDS and (own := _bind_name(bind)):
        names.add(own)
    return frozenset(names)


def warnings(bind: str, api_key: str | None, hosts: frozenset[str] | None) -> list[str]:
    """What to tell the operator at start: exposure to the network without a key, and a Host
    check that is off."""
    out = []
    if not is_loopback(bind) and api_key is None:
        out.append(f"warning: {bind or '*'} is reachable from the network and there is no "
                   "--api-key: anyone who can reach it can use the model")
    if hosts is None:
        out.append("warning: any Host header is accepted (bound to every interface without "
                   "--allowed-hosts), so web pages can reach the server by DNS rebinding; "
                   "list the names clients use with --allowed-hosts")
    return out


def _refusal(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse(APIError(status, message, "permission_error", code=code).body(), status)


class HostOriginGuard:
    """Pure ASGI middleware refusing (403, OpenAI's error shape) a request whose `Host` is not
    allowed or whose `Origin` is neither the server's own nor in `cors_origins`."""

    def __init__(self, app: Any, hosts: frozenset[str] | None, cors_origins: Collection[str]):
        self.app, self.hosts = app, hosts
        self.origins = {o.rstrip("/").lower() for o in cors_origins}

    def check(self, headers: Headers) -> JSONResponse | None:
        host = headers.get("host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return _refusal(403, f"the Host header {host!r} does not name this server; start "
                            "it with --allowed-hosts NAME to answer to that name",
                            "host_not_allowed")
        origin = headers.get("origin")
        if origin is None or "*" in self.origins or origin.rstrip("/").lower() in self.origins:
            return None
        if origin != "null" and urlsplit(origin).netloc.lower() == host.lower():
            return None  # the server's own page (the web chat)
        return _refusal(403, f"requests from web pages at {origin!r} are refused; start the "
                        "server with --cors-origin ORIGIN to allow one", "origin_not_allowed")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (refusal := self.check(Headers(scope=scope))):
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)
