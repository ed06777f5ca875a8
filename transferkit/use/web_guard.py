"""Who may talk to a local web server: the ``Host`` it answers for (no DNS rebinding), same-origin POSTs only
(no CSRF from a page the user happens to visit), and the security headers every answer carries."""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from transferkit.errors import TransferkitError

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.?")
log = logging.getLogger("uvicorn.error")


class HostCheck:
    """Which ``Host`` names this server answers: the address it is bound to (a loopback address also as
    ``localhost``; a wildcard address as any IP address) and the ``allowed_hosts`` given. Any other name is what
    a DNS-rebinding page would send."""

    def __init__(self, bound_host: str, allowed_hosts: Sequence[str] = ()):
        self.names = {_normal(bound_host), *(check_allowed_host(name) for name in allowed_hosts)}
        self.any_address = bound_host in _WILDCARD_HOSTS
        if self.any_address or _is_loopback(bound_host):
            self.names |= {"localhost", "127.0.0.1", "::1"}

    def refusal(self, host: str | None) -> str | None:
        """Why a request with this ``Host`` header is refused; None if it is answered."""
        name = _host_name(host)
        if name is not None and (name in self.names or (self.any_address and _is_ip(name))):
            return None
        return (f"this server does not answer for Host {host!r}; start serve with --allowed-host NAME to "
                "accept a name it is reached by")


def check_allowed_host(name: str) -> str:
    """``name`` as a host name or IP address (no port, scheme or path), lower-cased; else a one-line error."""
    text = str(name).strip().lower()
    if _is_ip(text) or _HOST_NAME.fullmatch(text):
        return text.rstrip(".")
    raise TransferkitError(f"bad value for --allowed-host: {name!r}; it must be a host name or IP address, "
                           "without port, scheme or path (e.g. mybox.local)")


def cross_origin(headers, host: str | None) -> str | None:
    """Why a state-changing request comes from another site (CSRF): its ``Origin`` is not this server, or the
    browser says it is cross-site; None when it is same-origin or from a non-browser client (curl sends neither)."""
    origin = headers.get("origin")
    if origin is not None and origin.lower() != f"http://{(host or '').lower()}":
        return f"cross-origin POST from {origin!r} refused; open the page on this server to upload"
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"{site} POST refused; open the page on this server to upload"
    return None


def guarded(app, hosts: HostCheck, csp: str):
    """``app`` behind the Host and Origin checks, with the security headers on every answer (ASGI middleware)."""
    from starlette.datastructures import Headers
    from starlette.responses import JSONResponse

    extra = [(name.lower().encode(), value.encode()) for name, value in
             {**SECURITY_HEADERS, "Content-Security-Policy": csp}.items()]

    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        headers = Headers(scope=scope)
        refusal = hosts.refusal(headers.get("host"))
        status = 400
        if refusal is None and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            refusal, status = cross_origin(headers, headers.get("host")), 403
        if refusal is not None:
            log.info("refused %s %s from %s: %s", scope["method"], scope["path"], client_name(scope), refusal)
            return await JSONResponse({"error": refusal}, status)(scope, receive, send_with_headers)
        await app(scope, receive, send_with_headers)

    return guarded


def exposure_warning(host: str) -> str | None:
    """A warning when ``host`` is reachable from other machines (anything but a loopback address)."""
    if _is_loopback(host):
        return None
    return (f"warning: serving on {host}: anyone who can reach this machine can upload images to the model; "
            "there is no authentication. Use the default --host 127.0.0.1 unless you mean it.")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _normal(host: str) -> str:
    return host.strip("[]").lower().rstrip(".")


def _host_name(host: str | None) -> str | None:
    """The name in a ``Host`` header (``[::1]:8000`` → ``::1``); None when it is missing or malformed."""
    if not host:
        return None
    try:
        parts = urlsplit("//" + host)
        parts.port  # noqa: B018 -- raises on a port that is not a number
    except ValueError:
        return None
    return _normal(parts.hostname) if parts.hostname else None


def client_name(request_or_scope) -> str:
    client = (request_or_scope.get("client") if isinstance(request_or_scope, dict) else request_or_scope.client)
    return f"{client[0]}:{client[1]}" if client else "a client"
