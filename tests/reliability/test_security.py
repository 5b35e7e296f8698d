"""Security: nobody without the token or the right certificate gets in, and no file the
server reads can run code.

- Token: every method the server registers (found through reflection, so a service
  added later is covered too) is refused without the token, with a wrong one, and with
  the token in the wrong form; only ``grpc.health.v1`` is exempt (probes), and the right
  token works (positive control, so the refusals are not an outage).
- mTLS: a client certificate from another CA, a self-signed one, or none is refused.
- No pickle: an AST scan of every project source for pickle-family imports,
  ``torch.load`` without ``weights_only=True``, ``torch.save``, ``np.load(allow_pickle=True)``
  and unsafe YAML.
- Checkpoints: weights replaced by a code-executing pickle (raw, and inside a
  ``torch.save``-style zip) with a manifest whose sha256 matches are refused by
  ``load_checkpoint`` and by a running server's hot reload, and the payload never runs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
import time
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from soak.harness import ServerThread, loopback_config
from tamiyo.policy.builtin import builtin_policy
from tamiyo.policy.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, set_latest
from tamiyo.v1 import tamiyo_service_pb2 as pb
from tamiyo.v1 import tamiyo_service_pb2_grpc as pb_grpc
from tamiyo_server.policy_holder import serve_loaded

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "tamiyo-test-token-0123456789"
HEALTH = "grpc.health.v1.Health"
Meta = tuple[tuple[str, str], ...]


@pytest.fixture(scope="module")
def token_server() -> Iterator[ServerThread]:
    config = loopback_config(auth_token=TOKEN)
    with ServerThread(config, policy=serve_loaded(builtin_policy(), "cpu")) as srv:
        yield srv


def _methods(target: str, metadata: Meta) -> list[str]:
    """Every ``/service/method`` the server exposes, via reflection."""
    with grpc.insecure_channel(target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=metadata,
            )
        )
        services = [s.name for s in replies[0].list_services_response.service]
        out = []
        for name in services:
            (reply,) = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)]),
                metadata=metadata,
            )
            from google.protobuf import descriptor_pb2

            for raw in reply.file_descriptor_response.file_descriptor_proto:
                fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                for svc in fd.service:
                    full = f"{fd.package}.{svc.name}" if fd.package else svc.name
                    if full == name:
                        out += [f"/{full}/{m.name}" for m in svc.method]
    return sorted(set(out))


def _call_raw(target: str, method: str, metadata: Meta | None) -> grpc.StatusCode:
    """Call ``method`` with an empty request (stream methods: one empty message)."""
    ident = lambda b: b  # noqa: E731
    with grpc.insecure_channel(target) as ch:
        try:
            if method.endswith(("/StreamTelemetry", "/ServerReflectionInfo", "/Watch")):
                call = ch.stream_stream(
                    method, request_serializer=ident, response_deserializer=ident
                )(iter([b""]), metadata=metadata, timeout=10)
                next(iter(call), None)
                return grpc.StatusCode.OK
            ch.unary_unary(method, request_serializer=ident, response_deserializer=ident)(
                b"", metadata=metadata, timeout=10
            )
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_every_rpc_without_the_token_is_refused(token_server: ServerThread) -> None:
    good: Meta = (("authorization", f"Bearer {TOKEN}"),)
    methods = _methods(token_server.target, good)
    expected = {
        "/tamiyo.v1.TamiyoService/StreamTelemetry",
        "/tamiyo.v1.TamiyoService/Decide",
        "/tamiyo.v1.TamiyoService/GetPolicyInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        f"/{HEALTH}/Check",
    }
    assert expected <= set(methods), methods
    bad: list[Meta | None] = [
        None,
        (("authorization", "Bearer wrong-token"),),
        (("authorization", f"Bearer {TOKEN[:-1]}"),),
        (("authorization", f"Bearer {TOKEN}x"),),
        (("authorization", TOKEN),),  # no scheme
        (("authorization", f"bearer{TOKEN}"),),
        (("x-api-key", TOKEN),),  # right secret, wrong header
    ]
    for method in methods:
        if method.startswith(f"/{HEALTH}/"):
            continue  # exempt so Kubernetes / Envoy probes work without the secret
        for md in bad:
            code = _call_raw(token_server.target, method, md)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, md, code)
    # Positive control: the right token passes authentication on every Tamiyo method.
    for method in methods:
        if method.startswith("/tamiyo.v1."):
            code = _call_raw(token_server.target, method, good)
            assert code != grpc.StatusCode.UNAUTHENTICATED, method


def test_health_needs_no_token(token_server: ServerThread) -> None:
    with grpc.insecure_channel(token_server.target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---------------------------------------------------------------------------- mTLS
def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert shutil.which("openssl"), "openssl CLI is needed to make test certificates"
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "rogue-ca"):
        _openssl(d, "req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN={ca}")  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who, ca, ext in (
        ("server", "ca", "server.ext"),
        ("client", "ca", "client.ext"),
        ("intruder", "rogue-ca", "client.ext"),
    ):
        _openssl(d, "req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr",
                 "-subj", f"/CN={who}")  # fmt: skip
        _openssl(d, "x509", "-req", "-in", f"{who}.csr", "-CA", f"{ca}.pem", "-CAkey",
                 f"{ca}.key", "-CAcreateserial", "-out", f"{who}.pem", "-days", "2",
                 "-extfile", ext)  # fmt: skip
    _openssl(d, "req", "-x509", *ec, "-keyout", "selfsigned.key", "-out", "selfsigned.pem",
             "-days", "2", "-subj", "/CN=client")  # fmt: skip
    return d


def _policy_info(target: str, creds: grpc.ChannelCredentials) -> grpc.StatusCode:
    with grpc.secure_channel(target, creds) as ch:
        try:
            pb_grpc.TamiyoServiceStub(ch).GetPolicyInfo(pb.GetPolicyInfoRequest(), timeout=10)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_mtls_refuses_a_wrong_client_certificate(pki: Path) -> None:
    config = loopback_config(
        tls_cert_file=str(pki / "server.pem"),
        tls_key_file=str(pki / "server.key"),
        tls_client_ca_file=str(pki / "ca.pem"),
    )
    ca = (pki / "ca.pem").read_bytes()

    def creds(who: str | None) -> grpc.ChannelCredentials:
        if who is None:
            return grpc.ssl_channel_credentials(ca)
        key, cert = (pki / f"{who}.key").read_bytes(), (pki / f"{who}.pem").read_bytes()
        return grpc.ssl_channel_credentials(ca, key, cert)

    with ServerThread(config, policy=serve_loaded(builtin_policy(), "cpu")) as srv:
        assert _policy_info(srv.target, creds("client")) == grpc.StatusCode.OK
        for who in ("intruder", "selfsigned", None):
            assert _policy_info(srv.target, creds(who)) == grpc.StatusCode.UNAVAILABLE, who
        with grpc.insecure_channel(srv.target) as plain:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.TamiyoServiceStub(plain).GetPolicyInfo(
                    pb.GetPolicyInfoRequest(), timeout=10
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert srv.alive


# ----------------------------------------------------------------------- no pickle
SOURCE_DIRS = ("tamiyo", "tamiyo_server", "tamiyo_client", "trainer", "tools", "soak", "bench")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}


def _unsafe_calls(tree: ast.AST, allow_save: bool = False) -> list[tuple[int, str]]:
    """Pickle-family imports and unsafe loads. ``allow_save``: tests may ``torch.save`` a
    file they read straight back with ``torch.load(weights_only=True)`` (a host model's
    own state_dict round trip), which the project rules allow; product code may not."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            mod = node.module if isinstance(node, ast.ImportFrom) else None
            for name in [mod, *names] if mod else names:
                if name and name.split(".")[0] in PICKLE_MODULES:
                    found.append((node.lineno, f"imports {name}"))
        if not isinstance(node, ast.Call):
            continue
        f = ast.unparse(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        # Exact names: safetensors.torch.load/save are the safe format, not pickle.
        if f in ("torch.load", "torch.serialization.load") and kw.get("weights_only") != "True":
            found.append((node.lineno, "torch.load without weights_only=True"))
        saves = f in ("torch.save", "torch.serialization.save") and not allow_save
        if saves or f.endswith((".to_pickle", "read_pickle")):
            found.append((node.lineno, f"{f} writes/reads pickle"))
        if f.endswith(("np.load", "numpy.load")) and kw.get("allow_pickle") == "True":
            found.append((node.lineno, "np.load(allow_pickle=True)"))
        yaml_call = f in ("yaml.load", "yaml.unsafe_load", "yaml.full_load")
        if yaml_call and "Safe" not in kw.get("Loader", ""):
            found.append((node.lineno, f"{f} without SafeLoader"))
        if f in ("marshal.loads", "marshal.load"):
            found.append((node.lineno, f))
    return found


def test_no_code_path_deserialises_pickle() -> None:
    files = [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    files += sorted((ROOT / "tests").rglob("*.py"))
    assert len(files) > 30
    problems = [
        f"{p.relative_to(ROOT)}:{line}: {what}"
        for p in files
        for line, what in _unsafe_calls(
            ast.parse(p.read_text(), str(p)), allow_save=p.is_relative_to(ROOT / "tests")
        )
    ]
    assert problems == []


def test_the_scanner_finds_what_it_looks_for() -> None:
    bad = (
        "import pickle\nfrom dill import loads\nimport torch\nimport numpy as np\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\ntorch.save({}, 'x')\n"
        "np.load('x', allow_pickle=True)\nimport yaml\nyaml.load('x')\n"
    )
    assert len(_unsafe_calls(ast.parse(bad))) == 7
    ok = "import torch\ntorch.load('x', weights_only=True)\nimport yaml\nyaml.safe_load('x')\n"
    assert _unsafe_calls(ast.parse(ok)) == []
    assert len(_unsafe_calls(ast.parse(bad), allow_save=True)) == 6  # torch.save allowed


# ------------------------------------------------------ checkpoints cannot run code
def _payload(marker: Path) -> bytes:
    """A protocol-0 pickle that runs ``touch marker`` when unpickled (hand-written, so
    no pickle module is needed to make it)."""
    return f"cposix\nsystem\n(S'touch {marker}'\ntR.".encode()


def _torch_zip(marker: Path) -> bytes:
    """The layout ``torch.save`` writes (a zip with data.pkl), carrying the payload."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", _payload(marker))
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
    return buf.getvalue()


def _plant(ckpt: Path, weights: bytes) -> None:
    """Replace the weights and make the manifest agree (hash and size), so only the
    format check stands between the file and the loader."""
    (ckpt / "model.safetensors").write_bytes(weights)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    manifest["weights_bytes"] = len(weights)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _good_checkpoint(root: Path, version: str) -> Path:
    pol = builtin_policy()
    return save_checkpoint(root, pol.model, pol.config, {"note": "test"}, {}, version=version)


@pytest.mark.parametrize("kind", ["raw_pickle", "torch_zip"])
def test_checkpoint_loading_cannot_run_code(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    ckpt = _good_checkpoint(tmp_path / "ckpts", "evil")
    _plant(ckpt, _payload(marker) if kind == "raw_pickle" else _torch_zip(marker))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(ckpt)
    assert not marker.exists(), "the checkpoint ran code"


def test_server_refuses_a_code_carrying_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    marker = tmp_path / "pwned"
    good = _good_checkpoint(root, "good-1")
    set_latest(root, good.name)
    config = replace(loopback_config(checkpoint_dir=str(root)), poll_interval_s=0.1)
    with ServerThread(config) as srv, grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.TamiyoServiceStub(ch)
        before = stub.GetPolicyInfo(pb.GetPolicyInfoRequest(), timeout=10)
        evil = _good_checkpoint(root, "evil-2")
        _plant(evil, _torch_zip(marker))
        set_latest(root, evil.name)
        deadline = time.monotonic() + 30
        info = before
        while info.reloads_failed == before.reloads_failed and time.monotonic() < deadline:
            time.sleep(0.1)
            info = stub.GetPolicyInfo(pb.GetPolicyInfoRequest(), timeout=10)
        assert info.reloads_failed == before.reloads_failed + 1
        assert "evil-2" in info.last_refused_path
        assert info.version == before.version, "the old policy keeps serving"
        assert not marker.exists(), "the checkpoint ran code"
