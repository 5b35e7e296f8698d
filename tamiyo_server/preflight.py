"""What a start checks before it binds a port or loads a policy: the TLS files, the
checkpoint directory and the experience directory. Each failure is one ``StartupError``
line naming the flag and the file (``cannot serve: ...``, exit code 2).

Why before binding, and why here rather than left to the libraries:
* gRPC reads the TLS files only inside ``add_secure_port`` and reports any problem there
  as a failure to bind: the cause went only to its C log (``Invalid cert chain file``),
  and a valid key of another certificate was not reported at all. The operator was told
  to look for a process holding the port. Python's ``ssl`` (OpenSSL) parses the same PEM
  and checks that key and certificate belong together.
* A ``--checkpoint-dir`` that is a regular file (a typo, a mount of the wrong path) served
  the bundled default policy as if nothing were wrong. A path that does not exist yet is
  still accepted: in the Kubernetes flow the trainer creates it later.
* An ``--experience-dir`` that cannot be created failed only after the policy had been
  loaded and calibrated, and its message did not name the flag.
"""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path

from tamiyo.config import ServerConfig


class StartupError(Exception):
    """The server could not start (a port taken, a directory it cannot write, ...); the
    message is one line naming the flag or variable to fix."""


def preflight(config: ServerConfig) -> None:
    """Every check of this module, cheapest first; raises ``StartupError``."""
    check_checkpoint_dir(config.checkpoint_dir)
    check_tls(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    check_experience_dir(config.experience.dir)


def check_checkpoint_dir(path: str) -> None:
    """A path that exists must be a directory; one that does not exist yet is watched."""
    if path and Path(path).exists() and not Path(path).is_dir():
        raise StartupError(
            f"--checkpoint-dir {path} is not a directory (a file?); give the directory "
            "that holds the 'latest' pointer and the version directories"
        )


def check_experience_dir(path: str) -> None:
    """Create the directory if needed and make sure a file can be created in it."""
    if not path:
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        where = f" ({e.filename})" if e.filename and str(e.filename) != path else ""
        raise StartupError(
            f"--experience-dir {path}: cannot create or write there: {e.strerror or e}{where}"
        ) from e


class _EncryptedKeyError(Exception):
    """The key asked for a passphrase (raised from ``load_cert_chain``'s callback)."""


def _no_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the terminal and hang the start.
    raise _EncryptedKeyError


def _readable(flag: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise StartupError(f"{flag} {path}: {e.strerror or e}") from e


def _reason(e: ssl.SSLError) -> str:
    return e.reason or str(e)


def check_tls(cert: str, key: str, client_ca: str = "") -> None:
    """The certificate chain and key parse as PEM and belong together; the client CA
    (mTLS) holds at least one PEM certificate. No-op without ``cert``."""
    if not cert:
        return
    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-client-ca", client_ca)):
        if path:
            _readable(flag, path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except ssl.SSLError as e:
        raise StartupError(
            f"--tls-cert {cert}: no PEM certificate in it ({_reason(e)}); it takes the "
            "server's certificate chain, --tls-key its private key"
        ) from e
    pair = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # Judge parsing and the match only: the system OpenSSL's security level (which may
    # refuse, e.g., a 1024-bit RSA key) is not what gRPC's own TLS library applies.
    pair.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        pair.load_cert_chain(cert, key, _no_passphrase)
    except _EncryptedKeyError:
        raise StartupError(
            f"--tls-key {key} is protected by a passphrase, which gRPC cannot use: "
            f"write an unencrypted copy (openssl pkey -in {key} -out <file>), readable "
            "only by the server"
        ) from None
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise StartupError(
                f"--tls-key {key} does not match --tls-cert {cert} (it is the key of "
                "another certificate)"
            ) from e
        raise StartupError(f"--tls-key {key}: not a PEM private key ({_reason(e)})") from e
    if client_ca:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=client_ca)
        except ssl.SSLError as e:
            raise StartupError(
                f"--tls-client-ca {client_ca}: no PEM CA certificate in it ({_reason(e)})"
            ) from e
