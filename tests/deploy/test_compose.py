"""deploy/compose.yaml: the gateway with Orthanc as its PACS, checked without a Docker engine.

The file is parsed and held to the gateway's real settings: the mounted TOML file and every DWG_*
variable (the image's and the compose file's) load through ``load_settings`` and name settings that
exist; Orthanc's registration of the gateway (AE title, host, C-MOVE port) agrees with the gateway's
own settings, and the nodes point at the Orthanc service. Then the same pair runs for real, as
processes on loopback: an Orthanc configured from the compose file's ORTHANC__* variables and a
gateway from its settings, with only host names and ports swapped for local ones, and a study is
found and retrieved by both C-GET and C-MOVE.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import Settings
from gateway.demo.data import generate_studies
from tests.deploy.support import (
    COMPOSE,
    CONFIG_PATH,
    DOCKERFILE,
    ROOT,
    dockerfile_env,
    load_deployed_settings,
    plain_env,
    toml_node_names,
    unknown_env_names,
    yaml_documents,
)
from tests.support.gatewayproc import GatewayProcess
from tests.support.realpacs import ORTHANC_BINARY, OrthancServer, free_port, require_binary

GATEWAY = "gateway"
ORTHANC = "orthanc"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    [doc] = yaml_documents(COMPOSE)
    return doc


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in compose["services"], f"compose.yaml has no service {name!r}"
    return compose["services"][name]


def mounted_config(compose: dict[str, Any]) -> Path:
    """The host file the gateway service mounts at the image's settings path."""
    for volume in service(compose, GATEWAY).get("volumes", []):
        source, target, *mode = volume.split(":")
        if target == CONFIG_PATH:
            assert mode == ["ro"], "the settings file is mounted read-only"
            return (COMPOSE.parent / source).resolve()
    raise AssertionError(f"the gateway service mounts nothing at {CONFIG_PATH}")


def gateway_env(compose: dict[str, Any]) -> dict[str, str]:
    """What the gateway's process sees: the image's ENV, then the compose file's environment."""
    return {**dockerfile_env(), **plain_env(service(compose, GATEWAY).get("environment"))}


@pytest.fixture(scope="module")
def settings(compose: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_deployed_settings(mounted_config(compose).read_text(), gateway_env(compose),
                                  tmp_path_factory.mktemp("compose"))


def orthanc_config(compose: dict[str, Any]) -> dict[str, Any]:
    """Orthanc's configuration from ORTHANC__* variables, by the orthancteam image's rule
    (ORTHANC__DICOM_MODALITIES is DicomModalities; values are JSON where they parse as JSON)."""
    config: dict[str, Any] = {}
    for name, value in plain_env(service(compose, ORTHANC).get("environment")).items():
        if not name.startswith("ORTHANC__"):
            continue
        assert "__" not in name[len("ORTHANC__"):], f"{name}: only top-level settings are used here"
        key = "".join(word.capitalize() for word in name[len("ORTHANC__"):].split("_"))
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return config


def gateway_registration(compose: dict[str, Any], ae_title: str) -> tuple[str, dict[str, Any]]:
    modalities = orthanc_config(compose).get("DicomModalities", {})
    found = [(name, m) for name, m in modalities.items() if isinstance(m, dict) and m.get("AET") == ae_title]
    assert len(found) == 1, f"Orthanc must know the gateway's AE title {ae_title!r} once (has {modalities})"
    return found[0]


def test_the_gateway_is_built_from_this_repository(compose: dict[str, Any]) -> None:
    build = service(compose, GATEWAY)["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_ports_are_published_on_loopback_only(compose: dict[str, Any], settings: Settings) -> None:
    ports = service(compose, GATEWAY)["ports"]
    assert ports, "the gateway's HTTP port is published"
    for spec in ports:
        host_ip, _host_port, container_port = str(spec).rsplit(":", 2)
        assert host_ip == "127.0.0.1", f"{spec}: publish on 127.0.0.1 only (a TLS proxy serves others)"
        assert int(container_port) == settings.server.port
    assert "ports" not in service(compose, ORTHANC), "Orthanc is reached through the gateway only"


def test_the_gateway_settings_are_real_and_valid(compose: dict[str, Any], settings: Settings) -> None:
    text = mounted_config(compose).read_text()
    assert unknown_env_names(gateway_env(compose), toml_node_names(text)) == []
    assert settings.server.host == "0.0.0.0" and settings.gateway.move_host == "0.0.0.0"
    modes = {n.retrieve for n in settings.nodes}
    assert {"get", "move"} <= modes, "the compose setup shows both retrieve modes"


def test_the_gateway_container_is_locked_down(compose: dict[str, Any]) -> None:
    gw = service(compose, GATEWAY)
    assert gw.get("read_only") is True
    assert gw.get("cap_drop") == ["ALL"]
    assert "no-new-privileges:true" in gw.get("security_opt", [])
    assert ORTHANC in gw.get("depends_on", [])


def test_orthanc_knows_the_gateway_as_its_move_destination(compose: dict[str, Any], settings: Settings) -> None:
    _, entry = gateway_registration(compose, settings.gateway.ae_title)
    assert entry["Host"] == GATEWAY, "the gateway's host name on the compose network is its service name"
    assert entry["Port"] == settings.gateway.move_port
    for what in ("AllowFind", "AllowGet", "AllowMove", "AllowStore"):
        assert entry.get(what, True) is True, f"the gateway needs {what}"


def test_the_nodes_are_the_orthanc_service(compose: dict[str, Any], settings: Settings) -> None:
    config = orthanc_config(compose)
    for node in settings.nodes:
        assert node.host == ORTHANC, f"{node.name}: the host is Orthanc's service name"
        assert node.port == int(config["DicomPort"])
        assert node.ae_title == config["DicomAet"]
    image = service(compose, ORTHANC)["image"]
    assert re.fullmatch(r"orthancteam/orthanc:\d+\.\d+\.\d+", image), f"pin Orthanc's image version (got {image})"


# --------------------------------------------------------------------------------------- live run


def test_the_compose_pair_finds_and_retrieves_by_cget_and_cmove(compose: dict[str, Any]) -> None:
    require_binary(ORTHANC_BINARY, "Orthanc (Debian package orthanc)")
    text = mounted_config(compose).read_text()
    gw_settings: dict[str, Any] = tomllib.loads(text)
    move_port = free_port()
    name, entry = gateway_registration(compose, gw_settings["gateway"]["ae_title"])
    config = orthanc_config(compose)
    local_entry = {**entry, "Host": "127.0.0.1", "Port": move_port}  # the only change: where it runs
    extra = {k: v for k, v in config.items() if k not in ("DicomAet", "DicomPort")}
    extra["DicomModalities"] = {name: local_entry}
    instances = generate_studies()
    study = [ds for ds in instances if ds.StudyInstanceUID == instances[0].StudyInstanceUID]
    with OrthancServer(aet=config["DicomAet"], extra_config=extra, stop_timeout=0) as orthanc:
        orthanc.load(study)
        for node in gw_settings["nodes"]:
            node.update(host="127.0.0.1", port=orthanc.dicom_port)
        gw_settings["gateway"].update(move_host="127.0.0.1", move_port=move_port)
        with GatewayProcess(gw_settings) as gateway:
            uid = study[0].StudyInstanceUID
            found = httpx.get(gateway.url(None, "/studies"), params={"StudyInstanceUID": uid}, timeout=30)
            assert found.status_code == 200 and len(found.json()) == 1, found.text
            for node in gw_settings["nodes"]:
                prefix = None if node.get("default") else node["name"]
                got = httpx.get(gateway.url(prefix, f"/studies/{uid}"), timeout=60,
                                headers={"Accept": 'multipart/related; type="application/dicom"'})
                assert got.status_code == 200, f"{node['name']} ({node['retrieve']}): {got.status_code} {got.text}"
                for ds in study:
                    assert ds.SOPInstanceUID.encode() in got.content, f"{node['name']}: an instance is missing"
