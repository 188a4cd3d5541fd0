"""Who may reach the service and who may change the index: Host allow-list, write token, Origin check.

- Host allow-list (against DNS rebinding): a request whose ``Host`` header names another host than
  the loopback names (``localhost``, ``127.0.0.1``, ``::1``), the address the service is bound to, or
  one given with ``--allowed-host`` gets 400 before any route runs. ``*`` allows any host.
- Writes (``POST /api/images``, ``DELETE /api/images/{id}``) need ``Authorization: Bearer TOKEN``
  whenever a token is configured (``--token-file`` or ``$CBIR_TOKEN``); a service bound to a
  non-loopback address that accepts writes refuses to start without one (``check_bind``).
- Every write is refused (403) when it comes from a browser page of another origin: an ``Origin``
  header whose host:port differs from the request's ``Host``, an ``Origin: null``, or
  ``Sec-Fetch-Site: cross-site``. Clients that send no ``Origin`` (curl, scripts) are judged by the token.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
TOKEN_ENV = "CBIR_TOKEN"


class ConfigError(ValueError):
    """The service cannot start as configured (message says why and what to do)."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(header: str) -> str:
    """The host name of a ``Host`` header value, lower case, without port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:  # name:port
        return header.split(":", 1)[0]
    return header  # bare name, or a bare IPv6 address


def read_token(token_file: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> str | None:
    """The write token: the first line of ``token_file``, else ``$CBIR_TOKEN``, else None.

    ConfigError for an unreadable or empty token file, or a token shorter than 16 characters.
    """
    env = os.environ if environ is None else environ
    if token_file is not None:
        path = Path(token_file)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise ConfigError(f"the token file {path} is empty")
    else:
        token = (env.get(TOKEN_ENV) or "").strip()
        if not token:
            return None
    if len(token) < 16:
        raise ConfigError("the write token must be at least 16 characters (e.g. `python -c \"import secrets; "
                          "print(secrets.token_urlsafe())\"`)")
    return token


@dataclass(frozen=True)
class Guard:
    """The access rules of one service: allowed Host names and the write token (None: no token)."""

    token: str | None = None
    allowed_hosts: frozenset[str] = field(default_factory=lambda: LOOPBACK_NAMES)

    @classmethod
    def for_bind(cls, bind_host: str = "127.0.0.1", token: str | None = None,
                 allowed_hosts: tuple[str, ...] | list[str] = ()) -> "Guard":
        """Loopback names + the bound address (when it is one address, not 0.0.0.0 / ::) + ``allowed_hosts``."""
        hosts = set(LOOPBACK_NAMES) | {host_of(h) if h != "*" else "*" for h in allowed_hosts}
        bind = bind_host.strip("[]").lower()
        if bind not in ("", "0.0.0.0", "::"):
            hosts.add(bind)
        return cls(token=token, allowed_hosts=frozenset(hosts))

    def host_allowed(self, host_header: str | None) -> bool:
        if "*" in self.allowed_hosts:
            return True
        return bool(host_header) and host_of(host_header) in self.allowed_hosts

    def foreign_origin(self, origin: str | None, host_header: str | None, fetch_site: str | None) -> str | None:
        """Why a write comes from another site (a message), or None when it does not."""
        if (fetch_site or "").lower() == "cross-site":
            return "cross-site request (Sec-Fetch-Site: cross-site)"
        if origin is None:
            return None
        if origin.strip().lower() == "null":
            return "request from an opaque origin (Origin: null)"
        try:
            netloc = urlsplit(origin.strip()).netloc.lower()
        except ValueError:
            netloc = ""
        if not netloc or netloc != (host_header or "").strip().lower():
            return f"request from another site (Origin {origin!r})"
        return None

    def token_ok(self, presented: str | None) -> bool:
        """True when no token is configured, or ``presented`` equals it (constant-time comparison)."""
        if self.token is None:
            return True
        return presented is not None and hmac.compare_digest(presented.encode(), self.token.encode())


def check_bind(host: str, token: str | None, read_only: bool) -> None:
    """ConfigError when the service would accept unauthenticated writes from other machines."""
    if not is_loopback(host) and token is None and not read_only:
        raise ConfigError(f"refusing to serve on {host} without a write token: anyone who reaches it could change the "
                          f"index. Give --token-file FILE (or set ${TOKEN_ENV}), or add --read-only")


class HostCheck:
    """ASGI middleware: 400 for an HTTP request whose Host header is not allowed by ``guard``."""

    def __init__(self, app, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if self.guard.host_allowed(host):
            return await self.app(scope, receive, send)
        body = json.dumps({"detail": f"host {host!r} is not allowed here (start the service with "
                                     f"--allowed-host NAME to serve it under another name)"}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
