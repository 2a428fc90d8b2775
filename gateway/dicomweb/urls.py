"""The public base URL of a request: configured, or from the request, honouring proxies we trust."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from starlette.requests import Request


@lru_cache(maxsize=64)
def _networks(proxies: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def _trusted(request: Request, proxies: tuple[str, ...]) -> bool:
    if not proxies or request.client is None:
        return False
    try:
        address = ipaddress.ip_address(request.client.host)
    except ValueError:
        return False
    return any(address in net for net in _networks(proxies))


def _forwarded(header: str) -> dict[str, str]:
    """The first element of an RFC 7239 Forwarded header, as a dict."""
    first = header.split(",")[0]
    out = {}
    for pair in first.split(";"):
        key, _, value = pair.strip().partition("=")
        if key and value:
            out[key.lower()] = value.strip('"')
    return out


def origin_and_prefix(request: Request, public_url: str, trusted_proxies: tuple[str, ...]) -> str:
    """``scheme://host[:port][/prefix]`` under which this gateway's routes are reached by clients."""
    if public_url:
        return public_url.rstrip("/")
    scheme = request.url.scheme
    host = request.headers.get("host") or request.url.netloc
    # inside a Mount, root_path includes the mount; app_root_path is the server's own prefix
    prefix = request.scope.get("app_root_path", request.scope.get("root_path", ""))
    if _trusted(request, trusted_proxies):
        fwd = _forwarded(request.headers.get("forwarded", ""))
        scheme = fwd.get("proto") or request.headers.get("x-forwarded-proto", "").split(",")[0].strip() or scheme
        host = fwd.get("host") or request.headers.get("x-forwarded-host", "").split(",")[0].strip() or host
        prefix = request.headers.get("x-forwarded-prefix", "").split(",")[0].strip().rstrip("/") or prefix
    return f"{scheme}://{host}{prefix}"
