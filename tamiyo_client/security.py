"""How the client reaches the server: plain, TLS or mTLS channels, and a bearer token."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tamiyo.cli_text import secret


@dataclass(frozen=True)
class ClientSecurity:
    """TLS and token settings. All optional: the default is a plaintext channel.

    - ``tls``: use TLS. ``root_certificates`` (PEM) pins the CA; None uses the system roots.
    - ``certificate_chain`` + ``private_key`` (PEM): a client certificate, for mTLS.
    - ``server_name``: override the name checked against the server certificate
      (useful when connecting by IP to a cert issued for a host name).
    - ``token``: sent as ``authorization: Bearer <token>`` metadata on every stream.
      It is sent on plaintext channels too (tests, local sidecars); use TLS elsewhere.
    """

    tls: bool = False
    root_certificates: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)  # (never in a log line)
    server_name: str | None = None
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("mTLS needs both certificate_chain and private_key, or neither")
        if not self.tls and (self.root_certificates or self.certificate_chain):
            raise ValueError("certificates were given but tls=False")
        if self.token is not None and (not self.token or any(c in self.token for c in "\r\n")):
            raise ValueError("token must be non-empty and contain no line breaks")
        if self.token is not None and (
            bad := sorted({c for c in self.token if not " " <= c <= "~"})
        ):
            # gRPC refuses such a header value on every attempt (INTERNAL: Invalid
            # metadata), which a client would retry forever: a configuration error.
            raise ValueError(
                f"token has characters a header value cannot carry: {bad!r} (printable "
                "ASCII only; strip the whitespace around a token read from a file)"
            )

    @classmethod
    def from_files(
        cls,
        *,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        token: str | None = None,
        server_name: str | None = None,
    ) -> ClientSecurity:
        """TLS settings from PEM files (any of them); ``ca`` alone = TLS with a pinned CA."""

        def read(p: str | Path | None) -> bytes | None:
            return Path(p).read_bytes() if p is not None else None

        tls = ca is not None or cert is not None
        return cls(
            tls=tls,
            root_certificates=read(ca),
            certificate_chain=read(cert),
            private_key=read(key),
            server_name=server_name,
            token=token,
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, target: str, options: Sequence[tuple[str, int | str]]) -> grpc.aio.Channel:
        """A new grpc.aio channel to ``target``; call from inside the event loop."""
        opts = list(options)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        if not self.tls:
            return grpc.aio.insecure_channel(target, options=opts)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )
        return grpc.aio.secure_channel(target, creds, options=opts)


def env_token() -> str:
    """The token a command-line tool sends by default: ``$TAMIYO_TOKEN``, else the
    server's own ``$TAMIYO_AUTH_TOKEN`` (one Secret can serve both sides), stripped of
    the newline a Secret file leaves; "" for none. Why from the environment: a token on
    the command line is in every process listing."""
    return (os.environ.get("TAMIYO_TOKEN") or os.environ.get("TAMIYO_AUTH_TOKEN", "")).strip()


def add_security_args(p: argparse.ArgumentParser) -> None:
    """The client tools' connection flags (``tamiyo-demo``, ``tamiyo-loadgen``): TLS,
    mTLS and the bearer token, read back by ``security_from_args``."""
    g = p.add_argument_group("connection security (default: plaintext, no token)")
    g.add_argument("--ca", help="PEM CA file: connect with TLS, pinned to this CA")
    g.add_argument("--cert", help="PEM client certificate (mTLS; with --key)")
    g.add_argument("--key", help="PEM client private key (mTLS; with --cert)")
    g.add_argument("--server-name", help="the name to check the server certificate against (by IP)")
    secret(
        g.add_argument(
            "--token",
            default=env_token(),
            help="bearer token, if the server wants one (default: $TAMIYO_TOKEN, else "
            "the server's $TAMIYO_AUTH_TOKEN, which keeps it off the command line)",
        )
    )


def security_from_args(a: argparse.Namespace) -> ClientSecurity:
    """``ClientSecurity`` from ``add_security_args``' flags. A bad file or pair stops the
    tool with one line naming the flag (``SystemExit``), before any connection."""
    if (a.cert is None) != (a.key is None):
        raise SystemExit("--cert and --key go together (mTLS): give both, or neither")
    for flag, path in (("--ca", a.ca), ("--cert", a.cert), ("--key", a.key)):
        if path is not None and not Path(path).is_file():
            raise SystemExit(f"{flag} {path}: no such file")
    try:
        return ClientSecurity.from_files(
            ca=a.ca, cert=a.cert, key=a.key, token=a.token or None, server_name=a.server_name
        )
    except (OSError, ValueError) as e:
        raise SystemExit(f"connection security: {e}") from None
