"""Every file in ``deploy/`` parses, and agrees with the code it deploys.

Why: manifests rot silently. A renamed flag, a changed default port or a new health
service name would leave ``kubectl apply`` succeeding and the pods never turning ready.
These tests read the manifests as data and check them against ``tamiyo.config`` defaults,
the server's real argparse parser (env vars are parsed by it, so a typo'd or removed
variable fails here) and the health service name the server registers.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tamiyo.config import ServerConfig
from tamiyo_server.app import SERVICE_NAME, SHUTDOWN_TAIL_S
from tamiyo_server.cli import build_parser, parse_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DEFAULTS = ServerConfig()

Doc = dict[str, Any]


def _load(path: Path) -> list[Doc]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path}: no YAML documents"
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is not a mapping"
    return docs


def _k8s() -> dict[str, Doc]:
    """All Kubernetes objects, keyed by ``Kind/name``."""
    objects: dict[str, Doc] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for d in _load(path):
            for key in ("apiVersion", "kind", "metadata"):
                assert key in d, f"{path}: object without {key}"
            ident = f"{d['kind']}/{d['metadata']['name']}"
            assert ident not in objects, f"{path}: duplicate {ident}"
            objects[ident] = d
    return objects


def _known_env() -> set[str]:
    """Env vars the server reads: one per CLI flag, plus literals in its source."""
    names = {
        f"TAMIYO_{a.dest.upper()}"
        for a in build_parser()._actions
        if any(o.startswith("--") for o in a.option_strings) and a.dest != "help"
    }
    for src in (ROOT / "tamiyo_server").glob("*.py"):
        names |= set(re.findall(r"\bTAMIYO_[A-Z0-9_]+\b", src.read_text()))
    return names


def _config_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ServerConfig:
    """Parse a manifest's environment with the server's own CLI, as the pod would."""
    for key in list(os.environ):
        if key.startswith("TAMIYO_"):
            monkeypatch.delenv(key)
    unknown = {k for k in env if k.startswith("TAMIYO_")} - _known_env()
    assert not unknown, f"env vars the server does not read: {sorted(unknown)}"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return parse_config([])


def _mount_for(container: Doc, path: str) -> Doc:
    """The volume mount under which ``path`` lives."""
    for m in container["volumeMounts"]:
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            return dict(m)
    raise AssertionError(f"{path} is on no volume mount of {container['name']}")


def _trainer_args(args: list[str]) -> argparse.Namespace:
    """Parse with the trainer's real command line (fails on a stale flag)."""
    from trainer.cli import _parser

    return _parser().parse_args(args)


def _server_container() -> tuple[Doc, Doc]:
    dep = _k8s()["Deployment/tamiyo-server"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, container


def _env_of(container: Doc) -> dict[str, str]:
    """Literal env values; every TAMIYO_* name (literal or from a Secret) must be one the
    server reads."""
    env = container.get("env", [])
    assert len({e["name"] for e in env}) == len(env), "duplicate env var"
    names = {e["name"] for e in env if e["name"].startswith("TAMIYO_")}
    assert names <= _known_env(), f"env vars the server does not read: {names - _known_env()}"
    return {e["name"]: str(e["value"]) for e in env if "value" in e}


def test_every_deploy_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 8
    for path in files:
        _load(path)


def test_kustomization_lists_every_manifest() -> None:
    (kust,) = _load(K8S / "kustomization.yaml")
    listed = set(kust["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_all_objects_in_one_namespace() -> None:
    objects = _k8s()
    assert "Namespace/tamiyo" in objects
    for ident, obj in objects.items():
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "tamiyo", ident


def test_deployment_ports_and_env_agree_with_server_cli(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dep, c = _server_container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": DEFAULTS.port, "metrics": DEFAULTS.metrics_port}
    cfg = _config_from_env(_env_of(c), monkeypatch)
    assert cfg.host == "0.0.0.0", "inside a pod the server must bind every interface"
    assert cfg.port == ports["grpc"]
    assert cfg.metrics_port == ports["metrics"]
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == cfg.metrics_port
    assert ann["prometheus.io/path"] == "/metrics"


def test_probes_ask_the_servers_health_service() -> None:
    _, c = _server_container()
    grpc_port = DEFAULTS.port
    for probe in ("startupProbe", "readinessProbe"):
        spec = c[probe]["grpc"]
        assert spec["port"] == grpc_port, probe
        # SERVING only once a policy is loaded and warm; NOT_SERVING while draining.
        assert spec["service"] == SERVICE_NAME, probe
    live = c["livenessProbe"]
    assert live["grpc"]["port"] == grpc_port
    assert live["grpc"]["service"] == ""


def test_drain_fits_in_the_termination_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    dep, c = _server_container()
    cfg = _config_from_env(_env_of(c), monkeypatch)
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # grace_s is one deadline for the whole drain; the stop's bounded tail comes after it
    total = float(pre_stop[1]) + cfg.grace_s + SHUTDOWN_TAIL_S
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > total
    live = c["livenessProbe"]
    # Liveness must not kill a replica that is draining (health NOT_SERVING for grace_s).
    assert live["periodSeconds"] * live["failureThreshold"] > cfg.grace_s


def test_token_comes_from_an_optional_secret_and_experience_is_writable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, c = _server_container()
    env = {e["name"]: e for e in c["env"]}
    ref = env["TAMIYO_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True, "without the Secret the server must still start"
    cfg = _config_from_env(_env_of(c), monkeypatch)
    mount = _mount_for(c, cfg.experience.dir)
    assert not mount.get("readOnly", False)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_checkpoints_reach_the_replicas_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    objects = _k8s()
    dep, c = _server_container()
    cfg = _config_from_env(_env_of(c), monkeypatch)
    pvc = objects["PersistentVolumeClaim/tamiyo-checkpoints"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "several replicas + the Job mount it"
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    mount = _mount_for(c, cfg.checkpoint_dir)
    assert mount["readOnly"] is True
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == pvc["metadata"]["name"]


def test_headless_service_selects_the_server_pods() -> None:
    objects = _k8s()
    dep, c = _server_container()
    svc = objects["Service/tamiyo"]
    assert svc["spec"]["clusterIP"] == "None", "client-side round_robin needs every pod IP"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    by_name = {p["name"]: p for p in svc["spec"]["ports"]}
    assert by_name["grpc"]["port"] == DEFAULTS.port
    assert by_name["metrics"]["port"] == DEFAULTS.metrics_port
    for p in svc["spec"]["ports"]:
        assert p["targetPort"] in container_ports
    pdb = objects["PodDisruptionBudget/tamiyo-server"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_trainer_job_runs_torchrun_into_the_shared_volume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = _k8s()
    _, server = _server_container()
    cfg = _config_from_env(_env_of(server), monkeypatch)
    job = objects["Job/tamiyo-train"]
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == server["image"]
    cmd = c["command"]
    assert cmd[0] == "torchrun"
    assert cmd[cmd.index("-m") + 1] == "trainer"
    ns = _trainer_args(c["args"])
    assert ns.cmd == "train"
    # trainer.loop writes checkpoints to <run dir>/checkpoints: the servers watch that.
    assert 'run_dir / "checkpoints"' in (ROOT / "trainer" / "loop.py").read_text()
    assert str(ns.out / "checkpoints") == cfg.checkpoint_dir
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in (str(ns.out), *map(str, ns.data)):
        mount = _mount_for(c, path)
        assert not mount.get("readOnly", False), "the trainer writes checkpoints"
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim == "tamiyo-checkpoints"
    (init,) = pod["initContainers"]
    script = init["command"][-1]
    assert f"ckpt={cfg.checkpoint_dir}" in script, "seeds the directory the servers watch"
    assert "python -m trainer generate" in script
    _mount_for(init, cfg.checkpoint_dir)
    # Same uid as the server, so replicas can read what the trainer writes.
    assert pod["securityContext"]["runAsUser"] == 10001
    assert (ROOT / "trainer" / "__init__.py").is_file()


def test_envoy_fronts_the_server_over_http2_with_grpc_health_checks() -> None:
    (envoy,) = _load(DEPLOY / "envoy" / "envoy.yaml")
    (listener,) = envoy["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == DEFAULTS.port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["route"]["timeout"] == "0s", "streams live as long as the training job"
    (cluster,) = envoy["static_resources"]["clusters"]
    assert route["route"]["cluster"] == cluster["name"]
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    proto = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in proto["explicit_http_config"]
    (hc,) = cluster["health_checks"]
    assert hc["grpc_health_check"]["service_name"] == SERVICE_NAME
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    sock = endpoint["address"]["socket_address"]
    assert sock["port_value"] == DEFAULTS.port
    (compose,) = _load(DEPLOY / "docker-compose.yaml")
    assert sock["address"] in compose["services"], "Envoy must resolve the compose service"


def test_compose_agrees_with_server_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    (compose,) = _load(DEPLOY / "docker-compose.yaml")
    services = compose["services"]
    server = services["tamiyo-server"]
    env = {k: str(v) for k, v in server["environment"].items()}
    cfg = _config_from_env(env, monkeypatch)
    assert cfg.host == "0.0.0.0"
    assert {int(p) for p in server["expose"]} == {cfg.port, cfg.metrics_port}
    (ckpt_volume,) = [v for v in server["volumes"] if v.startswith("checkpoints:")]
    _, mount_path, mode = ckpt_volume.split(":")
    assert mode == "ro"
    assert cfg.checkpoint_dir.startswith(mount_path + "/")
    health_cmd = " ".join(server["healthcheck"]["test"])
    assert f"service='{SERVICE_NAME}'" in health_cmd
    assert f"127.0.0.1:{cfg.port}" in health_cmd
    assert float(server["stop_grace_period"].rstrip("s")) > cfg.grace_s + SHUTDOWN_TAIL_S
    envoy = services["envoy"]
    mounted = envoy["volumes"][0].split(":")[0]
    assert (DEPLOY / mounted).resolve() == (DEPLOY / "envoy" / "envoy.yaml").resolve()
    assert envoy["ports"] == [f"127.0.0.1:{cfg.port}:{cfg.port}"]
    trainer = services["trainer"]
    assert trainer["entrypoint"][0] == "torchrun"
    assert f"checkpoints:{mount_path}" in trainer["volumes"]
    ns = _trainer_args(trainer["command"])
    assert str(ns.out / "checkpoints") == cfg.checkpoint_dir


def test_dockerfile_exposes_the_default_ports() -> None:
    text = (ROOT / "Dockerfile").read_text()
    exposed = {int(p) for p in re.findall(r"^EXPOSE (.+)$", text, re.M)[0].split()}
    assert exposed == {DEFAULTS.port, DEFAULTS.metrics_port}


def test_dockerfile_builds_the_native_forward() -> None:
    """The image installs with setup.py (the C module) and a compiler, and fails its build
    if the module is missing rather than shipping a slower server."""
    text = (ROOT / "Dockerfile").read_text()
    copies = " ".join(re.findall(r"^COPY (.+)$", text, re.M))
    assert "setup.py" in copies
    assert "gcc" in text
    assert "fused.available()" in text
    assert "frame_ingest.native_available()" in text
    # a module built on the host for its own CPU must not be copied in beside the source
    assert "**/*.so" in (ROOT / ".dockerignore").read_text().splitlines()
