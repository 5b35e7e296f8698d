"""Checking a gRPC target string before a client dials it.

Separate from the streaming client (``tamiyo_client.client``, which re-exports
``check_target``) because it is a pure string check, also made where no asyncio client
runs: ``tamiyo_client.process`` checks the target in the training process, before it
starts the sidecar.
"""

from __future__ import annotations

# gRPC name-resolver schemes a target may start with (``scheme:`` or ``scheme://``).
_SCHEMES = frozenset({"dns", "unix", "unix-abstract", "ipv4", "ipv6", "vsock", "xds"})


def check_target(target: str) -> None:
    """Raise ValueError, naming the problem, for a target gRPC cannot use.

    Accepted: ``host:port`` (``[v6addr]:port`` for IPv6), ``dns:///host:port``, and the
    other gRPC resolver forms (``unix:/path``, ``ipv4:addr:port,...``, ``ipv6:...``,
    ``xds:///...``). Why check here: gRPC accepts anything, then retries forever with a
    misleading error (a URL, a missing port it replaces with 443, an unknown scheme), and
    an empty target even wedged the client's thread and the next client's start()."""
    if not target.strip():
        raise ValueError("target is empty: give host:port (e.g. 127.0.0.1:50051)")
    if target != target.strip():
        raise ValueError(f"target {target!r} has surrounding whitespace")
    low = target.lower()
    if low.startswith(("http://", "https://")):
        raise ValueError(
            f"target {target!r}: give host:port (gRPC targets take no http:// or "
            "https://; TLS comes from ClientSecurity)"
        )
    scheme, sep, rest = target.partition(":")
    if sep and scheme.lower() in _SCHEMES:
        if not rest.strip("/"):
            raise ValueError(f"target {target!r}: nothing after {scheme}:")
        if scheme.lower() == "dns":
            _check_host_port(target, rest.lstrip("/").rpartition("/")[2])
        return
    if "://" in target:
        raise ValueError(
            f"target {target!r}: unknown scheme {target.split('://')[0]!r} (give host:port, "
            f"or one of gRPC's {', '.join(sorted(_SCHEMES))})"
        )
    _check_host_port(target, target)


def _check_host_port(target: str, hostport: str) -> None:
    """``hostport`` must be ``host:port`` (or ``[v6]:port``) with a port in 1-65535."""
    host, sep, port = hostport.rpartition(":")
    if ":" in host and not host.startswith("["):
        raise ValueError(f"target {target!r}: bracket an IPv6 address: [::1]:50051")
    if not sep or not host:
        raise ValueError(
            f"target {target!r}: no port (give host:port, e.g. {hostport or 'host'}:50051; "
            "gRPC would use 443)"
        )
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target {target!r}: port {port!r} is not a number in 1-65535")
