"""deploy/k8s: the C-GET Deployment and the C-MOVE StatefulSet, checked without a cluster.

kubernetes-validate holds every manifest to the API schemas (strict: no unknown fields) of the
oldest and newest Kubernetes versions it knows that we support. Then the pieces are held to each
other and to the gateway: Services select the pods and name their ports, the HPA scales the
Deployment (and nothing scales the StatefulSet), probes hit /ready and /health, the ConfigMap's
TOML loads with the container's environment through ``load_settings``, every DWG_* name is a real
setting, the Secret's files are where the settings look for them, and the StatefulSet's entrypoint
script, run by a real shell, gives each pod the AE title and C-MOVE port its own Service exposes.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from gateway.config import env_name_for_node
from tests.deploy.support import (
    CONFIG_PATH,
    K8S,
    dockerfile_env,
    dockerfile_instructions,
    load_deployed_settings,
    toml_node_names,
    unknown_env_names,
    yaml_documents,
)

OLDEST_SUPPORTED = "1.28.0"  # autoscaling/v2, policy/v1 and every field used here are GA by then
MODES = ("get", "move")


def manifests(mode: str) -> list[dict[str, Any]]:
    docs = []
    for path in sorted((K8S / mode).glob("*.yaml")):
        docs += yaml_documents(path)
    return docs


def only(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workload(mode: str) -> dict[str, Any]:
    return only(manifests(mode), "Deployment" if mode == "get" else "StatefulSet")


def container(mode: str) -> dict[str, Any]:
    [c] = workload(mode)["spec"]["template"]["spec"]["containers"]
    return c


def config_toml(mode: str) -> str:
    """The settings file the container reads: the ConfigMap key mounted at CONFIG_PATH."""
    pod = workload(mode)["spec"]["template"]["spec"]
    [mount] = [m for m in container(mode)["volumeMounts"] if m["mountPath"] == CONFIG_PATH]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmap = only(manifests(mode), "ConfigMap", volume["configMap"]["name"])
    return configmap["data"][mount["subPath"]]


def literal_env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def pod_labels(mode: str) -> dict[str, str]:
    return workload(mode)["spec"]["template"]["metadata"]["labels"]


# ----------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("version", [OLDEST_SUPPORTED, kubernetes_validate.latest_version()])
@pytest.mark.parametrize("mode", MODES)
def test_manifests_match_the_kubernetes_schemas(mode: str, version: str) -> None:
    docs = manifests(mode)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{mode}: {doc['kind']} {doc['metadata']['name']} against {version}: {exc.message} "
                        f"at {'/'.join(map(str, exc.path))}")


def test_the_schema_check_is_real() -> None:
    """A field the API does not have fails strict validation."""
    deployment = workload("get")
    broken = {**deployment, "spec": {**deployment["spec"], "replicass": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, OLDEST_SUPPORTED, strict=True)


# ---------------------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("mode", MODES)
def test_services_select_the_pods_and_name_their_ports(mode: str) -> None:
    labels = pod_labels(mode)
    port_names = {p["name"] for p in container(mode)["ports"]}
    services = [d for d in manifests(mode) if d["kind"] == "Service"]
    http = [s for s in services if all(labels.get(k) == v for k, v in s["spec"]["selector"].items())]
    assert http, "a Service selects the pods by their labels"
    for svc in http:
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{svc['metadata']['name']}: unknown port {port['targetPort']}"


@pytest.mark.parametrize("mode", MODES)
def test_probes_use_ready_and_health(mode: str) -> None:
    c = container(mode)
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    http = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["port"] in http


@pytest.mark.parametrize("mode", MODES)
def test_pods_run_locked_down_as_the_images_user(mode: str) -> None:
    pod = workload(mode)["spec"]["template"]["spec"]
    c = container(mode)
    [user] = [i.args for i in dockerfile_instructions() if i.keyword == "USER"]
    uid, _, gid = user.partition(":")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid) and pod["securityContext"]["runAsGroup"] == int(gid)
    assert pod["automountServiceAccountToken"] is False
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert c["resources"]["requests"]["cpu"], "the HPA's CPU target needs a request"


def test_the_hpa_scales_the_cget_deployment_and_nothing_else() -> None:
    hpas = [d for m in MODES for d in manifests(m) if d["kind"] == "HorizontalPodAutoscaler"]
    assert len(hpas) == 1
    target = hpas[0]["spec"]["scaleTargetRef"]
    deployment = workload("get")
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpas[0]["spec"]["minReplicas"] >= 2


@pytest.mark.parametrize("mode", MODES)
def test_referenced_configmaps_and_secrets_exist_unless_optional(mode: str) -> None:
    docs = manifests(mode)
    pod = workload(mode)["spec"]["template"]["spec"]
    for volume in pod["volumes"]:
        if "configMap" in volume:
            only(docs, "ConfigMap", volume["configMap"]["name"])
        if "secret" in volume and not volume["secret"].get("optional"):
            only(docs, "Secret", volume["secret"]["secretName"])
    for source in container(mode).get("envFrom", []):
        ref = source.get("secretRef") or source.get("configMapRef")
        if not ref.get("optional"):
            only(docs, "Secret" if "secretRef" in source else "ConfigMap", ref["name"])


@pytest.mark.parametrize("mode", MODES)
def test_the_container_serves_the_mounted_settings_file(mode: str) -> None:
    """The image's entrypoint (Deployment) or the StatefulSet's script, which hands over to its
    arguments, runs ``dicomweb-gateway serve`` on the file the ConfigMap is mounted as."""
    c = container(mode)
    serve = ["serve", "--config", CONFIG_PATH]
    if mode == "get":
        assert "command" not in c and c["args"] == serve
    else:
        assert c["command"][:2] == ["/bin/sh", "-c"] and 'exec "$@"' in c["command"][2]
        assert c["args"] == ["dicomweb-gateway", *serve]
    assert any(m["mountPath"] == CONFIG_PATH and m.get("readOnly") for m in c["volumeMounts"])


# -------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("mode", MODES)
def test_the_configmap_settings_load_in_the_container(mode: str, tmp_path: Path) -> None:
    toml = config_toml(mode)
    env = {**dockerfile_env(), **literal_env(container(mode))}
    assert unknown_env_names(env, toml_node_names(toml)) == []
    settings = load_deployed_settings(toml, env, tmp_path)
    modes = {n.retrieve for n in settings.nodes}
    if mode == "get":
        assert modes == {"get"}, "the Deployment is stateless: C-GET only"
        assert settings.gateway.move_port == 0, "no C-MOVE receiver in C-GET mode"
    else:
        assert modes & {"move", "get-then-move"}
        assert settings.gateway.move_port > 0


@pytest.mark.parametrize("mode", MODES)
def test_the_dicom_tls_secret_holds_the_files_the_settings_name(mode: str, tmp_path: Path) -> None:
    """Mounted where the container mounts it, the Secret's keys are the files [nodes.tls] reads:
    with them in place, turning TLS on by environment gives valid settings."""
    pod = workload(mode)["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if "secret" in v]
    [mount] = [m for m in container(mode)["volumeMounts"] if m["name"] == volume["name"]]
    secret = only(manifests(mode), "Secret", volume["secret"]["secretName"])
    files = tmp_path / "tls"
    files.mkdir()
    for key, value in secret["stringData"].items():
        (files / key).write_text(value)
    toml = config_toml(mode).replace(mount["mountPath"], str(files))
    assert str(files) in toml, f"[nodes.tls] reads its files under {mount['mountPath']}"
    env = {**dockerfile_env(), **literal_env(container(mode))}
    for node in toml_node_names(toml):
        env[f"{env_name_for_node(node)}_TLS_ENABLED"] = "true"
    settings = load_deployed_settings(toml, env, tmp_path)
    assert all(n.tls.enabled and Path(n.tls.key_file).is_file() for n in settings.nodes)


# --------------------------------------------------------------------------- C-MOVE: one AE per pod


def run_entrypoint(pod_name: str) -> subprocess.CompletedProcess[str]:
    """The StatefulSet container's command, run by a real POSIX shell with the pod's environment,
    in front of a program that prints the DWG_* variables it was started with."""
    c = container("move")
    sh = shutil.which("sh")
    assert sh
    argv = [sh, *c["command"][1:]]
    printer = ["env"]
    env = {"PATH": "/usr/bin:/bin", "POD_NAME": pod_name, **literal_env(c)}
    return subprocess.run(argv + printer, env=env, capture_output=True, text=True, timeout=30)


def statefulset_pod_env(ordinal: int) -> dict[str, str]:
    name = f"{workload('move')['metadata']['name']}-{ordinal}"
    proc = run_entrypoint(name)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if line.startswith("DWG_"))


def test_each_statefulset_pod_is_its_own_move_destination(tmp_path: Path) -> None:
    statefulset = workload("move")
    replicas = statefulset["spec"]["replicas"]
    assert replicas >= 2
    docs = manifests("move")
    toml = config_toml("move")
    ae_titles, ports = set(), set()
    for ordinal in range(replicas):
        pod_env = statefulset_pod_env(ordinal)
        assert unknown_env_names(pod_env, toml_node_names(toml)) == []
        settings = load_deployed_settings(toml, {**dockerfile_env(), **pod_env}, tmp_path)
        ae_titles.add(settings.gateway.ae_title)
        ports.add(settings.gateway.move_port)
        # its own Service reaches exactly this pod, on exactly this port
        pod_name = f"{statefulset['metadata']['name']}-{ordinal}"
        services = [d for d in docs if d["kind"] == "Service"
                    and d["spec"]["selector"] == {"statefulset.kubernetes.io/pod-name": pod_name}]
        assert len(services) == 1, f"pod {pod_name} needs one Service for the PACS's C-STOREs"
        [port] = services[0]["spec"]["ports"]
        assert port["targetPort"] == settings.gateway.move_port, pod_name
    assert len(ae_titles) == len(ports) == replicas, "every pod has an AE title and a port of its own"


def test_the_entrypoint_refuses_a_pod_name_without_an_ordinal() -> None:
    proc = run_entrypoint("dicomweb-gateway-move")
    assert proc.returncode != 0 and "ordinal" in proc.stderr
    assert "DWG_GATEWAY_AE_TITLE" not in proc.stdout


def test_the_statefulset_has_its_governing_headless_service() -> None:
    statefulset = workload("move")
    governing = only(manifests("move"), "Service", statefulset["spec"]["serviceName"])
    assert governing["spec"].get("clusterIP") == "None"
    assert not any(d["kind"] == "HorizontalPodAutoscaler" for d in manifests("move"))
