"""Settings: TOML file, environment overrides and validation with errors that name the setting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, Settings, env_name_for_node, load_settings, settings_schema

NODE: dict[str, Any] = {"name": "pacs", "ae_title": "MAIN-PACS", "host": "10.1.2.3", "port": 104}


pytestmark = pytest.mark.usefixtures("auth_off")


def with_node(**changes: Any) -> dict[str, Any]:
    return {"nodes": [{**NODE, **changes}]}


def config_error(data: dict[str, Any] | None = None, path: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(path, data=data)
    return info.value


# ------------------------------------------------------------------------------------------------
# Defaults


class TestDefaults:
    def test_every_default(self):
        s = load_settings(data={"nodes": [NODE]})
        assert isinstance(s, Settings)
        assert (s.server.host, s.server.port, s.server.public_url) == ("127.0.0.1", 8080, "")
        assert s.server.trusted_proxies == ()
        assert (s.server.log_level, s.server.log_json) == ("info", False)
        assert (s.gateway.ae_title, s.gateway.move_host, s.gateway.move_port) == ("DICOMWEB-GW", "127.0.0.1", 11113)
        q = s.qido
        assert (q.max_results, q.empty_status, q.fanout_concurrency, q.fanout_max_parents) == (1000, 200, 4, 1000)
        assert (q.strict_accept, q.warning_quoted) == (False, False)
        (n,) = s.nodes
        assert (n.name, n.ae_title, n.host, n.port) == ("pacs", "MAIN-PACS", "10.1.2.3", 104)
        assert n.retrieve == "get"
        assert (n.max_associations, n.acquire_timeout, n.idle_timeout) == (4, 5.0, 20.0)
        assert (n.max_pdu, n.charset, n.relational, n.fuzzy, n.retries) == (
            1048576,
            "ISO_IR 192",
            "negotiate",
            False,
            2,
        )
        t = n.timeouts
        assert (t.connect, t.acse, t.dimse) == (5.0, 10.0, 30.0)
        assert isinstance(t.dimse, float)
        assert (n.tls.enabled, n.tls.ca_file, n.tls.cert_file, n.tls.key_file) == (False, "", "", "")

    def test_a_lone_node_is_the_default(self):
        s = load_settings(data={"nodes": [NODE]})
        assert s.nodes[0].default is True
        assert s.default_node.name == "pacs"

    def test_node_lookup(self):
        s = load_settings(data={"nodes": [{**NODE, "default": True}, {**NODE, "name": "b"}]})
        assert s.node("b").name == "b"
        assert s.node("nope") is None
        assert s.default_node.name == "pacs"

    def test_no_nodes_at_all(self):
        assert config_error({}).setting == "nodes"
        assert config_error({"nodes": []}).setting == "nodes"

    def test_no_file_and_no_data(self):
        assert config_error().setting == "nodes"

    def test_schema_lists_nested_settings(self):
        schema = settings_schema()
        assert {"server", "gateway", "qido", "wado", "stow", "nodes"} <= set(schema)
        assert {"auth", "audit"} <= set(schema) and "api_keys.hash" in schema["auth"]
        assert "port" in schema["server"]
        assert {"timeouts.dimse", "timeouts.connect", "tls.ca_file", "tls.enabled", "name"} <= set(schema["nodes"])


# ------------------------------------------------------------------------------------------------
# A full TOML file


FULL_TOML = """
[server]
host = "0.0.0.0"
port = 9090
public_url = "https://gw.example.org/dicomweb"
trusted_proxies = ["10.0.0.0/8", "::1"]
log_level = "debug"
log_json = true

[gateway]
ae_title = "GW"
move_host = "192.0.2.10"
move_port = 11112

[qido]
max_results = 50
empty_status = 204
fanout_concurrency = 2
fanout_max_parents = 10
strict_accept = true
warning_quoted = true

[[nodes]]
name = "main"
ae_title = "MAIN-PACS"
host = "10.1.2.3"
port = 104
retrieve = "move"
max_associations = 8
acquire_timeout = 2.5
idle_timeout = 15
max_pdu = 0
charset = "ISO_IR 100"
relational = "off"
fuzzy = true
retries = 0

[nodes.timeouts]
connect = 1
acse = 2.5
dimse = 120

[nodes.tls]
enabled = true
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
server_name = "pacs.example.org"

[[nodes]]
name = "archive"
ae_title = "ARCHIVE"
host = "archive.example.org"
port = 11112
default = true
"""


@pytest.fixture
def full_file(tmp_path: Path) -> Path:
    paths = {}
    for name in ("ca", "cert", "key"):
        p = tmp_path / f"{name}.pem"
        p.write_text("-----BEGIN DUMMY-----\n")
        paths[name] = p.as_posix()
    config = tmp_path / "gateway.toml"
    config.write_text(FULL_TOML.format(**paths))
    return config


class TestFile:
    def test_full_file(self, full_file: Path, tmp_path: Path):
        s = load_settings(full_file)
        assert (s.server.host, s.server.port) == ("0.0.0.0", 9090)
        assert s.server.public_url == "https://gw.example.org/dicomweb"
        assert s.server.trusted_proxies == ("10.0.0.0/8", "::1")
        assert (s.server.log_level, s.server.log_json) == ("debug", True)
        assert (s.gateway.ae_title, s.gateway.move_host, s.gateway.move_port) == ("GW", "192.0.2.10", 11112)
        q = s.qido
        assert (q.max_results, q.empty_status, q.fanout_concurrency, q.fanout_max_parents) == (50, 204, 2, 10)
        assert q.strict_accept and q.warning_quoted
        main, archive = s.nodes
        assert (main.name, main.retrieve, main.max_associations, main.max_pdu) == ("main", "move", 8, 0)
        assert (main.acquire_timeout, main.idle_timeout) == (2.5, 15.0)
        assert (main.charset, main.relational, main.fuzzy, main.retries) == ("ISO_IR 100", "off", True, 0)
        assert (main.timeouts.connect, main.timeouts.acse, main.timeouts.dimse) == (1.0, 2.5, 120.0)
        assert main.tls.enabled and main.tls.server_name == "pacs.example.org"
        assert main.tls.ca_file == (tmp_path / "ca.pem").as_posix()
        assert main.default is False
        assert archive.default is True and s.default_node is archive
        assert archive.timeouts.dimse == 30.0

    def test_file_path_may_be_a_string(self, full_file: Path):
        assert load_settings(str(full_file)).server.port == 9090

    def test_data_overrides_file_sections(self, full_file: Path):
        s = load_settings(full_file, data={"server": {"port": 1234}})
        assert s.server.port == 1234
        assert s.server.host == "127.0.0.1"  # the whole [server] table was replaced
        assert len(s.nodes) == 2

    def test_missing_file(self, tmp_path: Path):
        err = config_error(path=tmp_path / "absent.toml")
        assert err.setting == "--config"
        assert "absent.toml" in err.problem

    def test_invalid_toml(self, tmp_path: Path):
        bad = tmp_path / "bad.toml"
        bad.write_text("[server\nport = 1\n")
        assert config_error(path=bad).setting == str(bad)

    def test_error_in_file_names_the_setting(self, tmp_path: Path):
        config = tmp_path / "gateway.toml"
        config.write_text('[[nodes]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 70000\n')
        err = config_error(path=config)
        assert err.setting == "nodes[0].port"
        assert "70000" in err.problem
        assert str(err).startswith("nodes[0].port: ")

    def test_nodes_as_a_table_instead_of_an_array(self, tmp_path: Path):
        config = tmp_path / "gateway.toml"
        config.write_text('[nodes]\nname = "p"\n')
        assert config_error(path=config).setting == "nodes"

    def test_nan_timeout_in_file(self, tmp_path: Path):
        config = tmp_path / "gateway.toml"
        config.write_text(
            '[[nodes]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\n[nodes.timeouts]\ndimse = nan\n'
        )
        assert config_error(path=config).setting == "nodes[0].timeouts.dimse"


# ------------------------------------------------------------------------------------------------
# Validation: every kind of invalid value names its setting


INVALID = [
    # server
    ({"server": {"port": 70000}}, "server.port"),
    ({"server": {"port": 65536}}, "server.port"),
    ({"server": {"port": -1}}, "server.port"),
    ({"server": {"port": True}}, "server.port"),
    ({"server": {"port": 80.5}}, "server.port"),
    ({"server": {"host": 5}}, "server.host"),
    ({"server": {"log_level": "verbose"}}, "server.log_level"),
    ({"server": {"log_json": "maybe"}}, "server.log_json"),
    ({"server": {"public_url": "ftp://gw.example.org"}}, "server.public_url"),
    ({"server": {"public_url": "/dicomweb"}}, "server.public_url"),
    ({"server": {"public_url": "gw.example.org"}}, "server.public_url"),
    ({"server": {"public_url": "https://"}}, "server.public_url"),
    ({"server": {"public_url": "https://gw/a?b=1"}}, "server.public_url"),
    ({"server": {"public_url": "https://gw/a#frag"}}, "server.public_url"),
    ({"server": {"trusted_proxies": ["10.0.0.0/8", "nope"]}}, "server.trusted_proxies[1]"),
    ({"server": {"trusted_proxies": ["10.0.0.0/33"]}}, "server.trusted_proxies[0]"),
    ({"server": {"trusted_proxies": ["300.1.1.1"]}}, "server.trusted_proxies[0]"),
    ({"server": {"trusted_proxies": [1]}}, "server.trusted_proxies"),
    ({"server": {"prot": 1}}, "server.prot"),
    ({"server": 5}, "server"),
    # gateway
    ({"gateway": {"ae_title": "X" * 17}}, "gateway.ae_title"),
    ({"gateway": {"ae_title": ""}}, "gateway.ae_title"),
    ({"gateway": {"ae_title": "    "}}, "gateway.ae_title"),
    ({"gateway": {"ae_title": "A\\B"}}, "gateway.ae_title"),
    ({"gateway": {"ae_title": "GÄTE"}}, "gateway.ae_title"),
    ({"gateway": {"ae_title": "A\nB"}}, "gateway.ae_title"),
    ({"gateway": {"move_port": 70000}}, "gateway.move_port"),
    ({"gateway": {"colour": "red"}}, "gateway.colour"),
    # qido
    ({"qido": {"max_results": 0}}, "qido.max_results"),
    ({"qido": {"empty_status": 404}}, "qido.empty_status"),
    ({"qido": {"fanout_concurrency": 0}}, "qido.fanout_concurrency"),
    ({"qido": {"fanout_max_parents": 0}}, "qido.fanout_max_parents"),
    ({"qido": {"strict_accept": "yes please"}}, "qido.strict_accept"),
    ({"qido": {"limit": 5}}, "qido.limit"),
    # sections
    ({"srv": {}}, "srv"),
    ({"node": [NODE]}, "node"),
]


@pytest.mark.parametrize("data,setting", INVALID, ids=[s for _, s in INVALID])
def test_invalid_section_settings(data, setting):
    err = config_error({"nodes": [NODE], **data})
    assert err.setting == setting
    assert str(err).startswith(f"{setting}: ")
    assert err.problem


INVALID_NODE = [
    ({"port": 0}, "nodes[0].port"),
    ({"port": 70000}, "nodes[0].port"),
    ({"port": "104x"}, "nodes[0].port"),
    ({"ae_title": "A" * 17}, "nodes[0].ae_title"),
    ({"ae_title": ""}, "nodes[0].ae_title"),
    ({"ae_title": "A\\B"}, "nodes[0].ae_title"),
    ({"host": ""}, "nodes[0].host"),
    ({"name": "bad name"}, "nodes[0].name"),
    ({"name": "-starts-with-dash"}, "nodes[0].name"),
    ({"name": "x" * 65}, "nodes[0].name"),
    ({"retrieve": "fetch"}, "nodes[0].retrieve"),
    ({"relational": "sometimes"}, "nodes[0].relational"),
    ({"charset": "latin1"}, "nodes[0].charset"),
    ({"charset": "ISO_IR 101"}, "nodes[0].charset"),
    ({"max_associations": 0}, "nodes[0].max_associations"),
    ({"max_associations": 257}, "nodes[0].max_associations"),
    ({"max_pdu": 100}, "nodes[0].max_pdu"),
    ({"max_pdu": 2**32}, "nodes[0].max_pdu"),
    ({"retries": -1}, "nodes[0].retries"),
    ({"retries": 6}, "nodes[0].retries"),
    ({"acquire_timeout": -1}, "nodes[0].acquire_timeout"),
    ({"idle_timeout": 0}, "nodes[0].idle_timeout"),
    ({"fuzzy": "sure"}, "nodes[0].fuzzy"),
    ({"default": 1}, "nodes[0].default"),
    ({"timeouts": {"dimse": -1}}, "nodes[0].timeouts.dimse"),
    ({"timeouts": {"connect": 0}}, "nodes[0].timeouts.connect"),
    ({"timeouts": {"acse": -0.5}}, "nodes[0].timeouts.acse"),
    ({"timeouts": {"dimse": True}}, "nodes[0].timeouts.dimse"),
    ({"timeouts": {"dimse": "30s"}}, "nodes[0].timeouts.dimse"),
    ({"timeouts": {"read": 5}}, "nodes[0].timeouts.read"),
    ({"timeouts": 5}, "nodes[0].timeouts"),
    ({"tls": {"enabled": True, "ca_file": "/nonexistent/ca.pem"}}, "nodes[0].tls.ca_file"),
    (
        {"tls": {"enabled": True, "cert_file": "/nonexistent/c.pem", "key_file": "/nonexistent/k.pem"}},
        "nodes[0].tls.cert_file",
    ),
    ({"tls": {"foo": 1}}, "nodes[0].tls.foo"),
    ({"colour": "red"}, "nodes[0].colour"),
]


@pytest.mark.parametrize("changes,setting", INVALID_NODE, ids=[s for _, s in INVALID_NODE])
def test_invalid_node_settings(changes, setting):
    err = config_error(with_node(**changes))
    assert err.setting == setting
    assert err.problem


@pytest.mark.parametrize("missing", ["name", "ae_title", "host", "port"])
def test_required_node_settings(missing):
    node = {k: v for k, v in NODE.items() if k != missing}
    err = config_error({"nodes": [node]})
    assert err.setting == f"nodes[0].{missing}"
    assert "required" in err.problem


def test_second_node_errors_name_its_index():
    err = config_error({"nodes": [{**NODE, "default": True}, {**NODE, "name": "b", "port": 0}]})
    assert err.setting == "nodes[1].port"


class TestNodeSet:
    def test_duplicate_names(self):
        err = config_error({"nodes": [{**NODE, "default": True}, dict(NODE)]})
        assert err.setting == "nodes[1].name"
        assert "pacs" in err.problem

    def test_two_defaults(self):
        err = config_error({"nodes": [{**NODE, "default": True}, {**NODE, "name": "b", "default": True}]})
        assert err.setting == "nodes"
        assert "pacs" in err.problem and "b" in err.problem

    def test_no_default_among_several(self):
        assert config_error({"nodes": [NODE, {**NODE, "name": "b"}]}).setting == "nodes"

    def test_nodes_not_a_list(self):
        assert config_error({"nodes": NODE}).setting == "nodes"

    def test_node_not_a_table(self):
        assert config_error({"nodes": ["pacs"]}).setting == "nodes[0]"

    @pytest.mark.parametrize("first,second", [("pacs", "PACS"), ("my-pacs", "my_pacs")])
    def test_names_that_share_environment_variables(self, first, second):
        err = config_error({"nodes": [{**NODE, "name": first, "default": True}, {**NODE, "name": second}]})
        assert err.setting == "nodes[1].name"


class TestValidValues:
    @pytest.mark.parametrize("port", [0, 1, 65535])
    def test_server_ports(self, port):
        assert load_settings(data={"server": {"port": port}, "nodes": [NODE]}).server.port == port

    @pytest.mark.parametrize("ae", ["A", "X" * 16, "MY PACS", "pacs_1-2"])
    def test_ae_titles(self, ae):
        assert load_settings(data=with_node(ae_title=ae)).nodes[0].ae_title == ae

    @pytest.mark.parametrize("url", ["http://gw:8080", "https://gw.example.org/prefix", "https://gw/prefix/"])
    def test_public_urls(self, url):
        assert load_settings(data={"server": {"public_url": url}, "nodes": [NODE]}).server.public_url == url

    @pytest.mark.parametrize("proxy", ["10.0.0.0/8", "192.168.1.1", "::1", "fd00::/8", "10.0.0.1/8"])
    def test_trusted_proxies(self, proxy):
        s = load_settings(data={"server": {"trusted_proxies": [proxy]}, "nodes": [NODE]})
        assert s.server.trusted_proxies == (proxy,)

    @pytest.mark.parametrize("mode", ["get", "move", "get-then-move"])
    def test_retrieve_modes(self, mode):
        assert load_settings(data=with_node(retrieve=mode)).nodes[0].retrieve == mode

    @pytest.mark.parametrize("charset", ["ISO_IR 192", "ISO_IR 100", "ISO_IR 6"])
    def test_charsets(self, charset):
        assert load_settings(data=with_node(charset=charset)).nodes[0].charset == charset

    def test_tls_files_are_not_checked_when_tls_is_off(self):
        s = load_settings(data=with_node(tls={"enabled": False, "ca_file": "/nonexistent/ca.pem"}))
        assert s.nodes[0].tls.ca_file == "/nonexistent/ca.pem"

    def test_tls_cert_needs_key(self, tmp_path: Path):
        cert = tmp_path / "c.pem"
        cert.write_text("x")
        err = config_error(with_node(tls={"enabled": True, "cert_file": str(cert)}))
        assert err.setting == "nodes[0].tls"

    def test_tls_with_existing_files(self, tmp_path: Path):
        files = {}
        for key in ("ca_file", "cert_file", "key_file"):
            (tmp_path / key).write_text("x")
            files[key] = str(tmp_path / key)
        s = load_settings(data=with_node(tls={"enabled": True, **files}))
        assert s.nodes[0].tls.key_file == files["key_file"]

    def test_integer_timeouts_become_floats(self):
        t = load_settings(data=with_node(timeouts={"dimse": 7})).nodes[0].timeouts
        assert t.dimse == 7.0 and isinstance(t.dimse, float)

    def test_unlimited_pdu(self):
        assert load_settings(data=with_node(max_pdu=0)).nodes[0].max_pdu == 0


# ------------------------------------------------------------------------------------------------
# Environment overrides


class TestEnvironment:
    def test_server_scalar(self, monkeypatch):
        monkeypatch.setenv("DWG_SERVER_PORT", "9000")
        assert load_settings(data={"nodes": [NODE]}).server.port == 9000

    def test_env_wins_over_the_file(self, monkeypatch, full_file: Path):
        monkeypatch.setenv("DWG_SERVER_PORT", " 9100 ")
        monkeypatch.setenv("DWG_GATEWAY_AE_TITLE", "FROM-ENV")
        s = load_settings(full_file)
        assert s.server.port == 9100
        assert s.gateway.ae_title == "FROM-ENV"
        assert s.server.host == "0.0.0.0"  # the rest of the file stays

    def test_node_scalar(self, monkeypatch):
        monkeypatch.setenv("DWG_NODE_PACS_PORT", "11112")
        monkeypatch.setenv("DWG_NODE_PACS_AE_TITLE", "OTHER-AE")
        n = load_settings(data={"nodes": [NODE]}).nodes[0]
        assert (n.port, n.ae_title) == (11112, "OTHER-AE")

    def test_node_nested_timeout(self, monkeypatch):
        monkeypatch.setenv("DWG_NODE_PACS_TIMEOUTS_DIMSE", "12.5")
        t = load_settings(data={"nodes": [NODE]}).nodes[0].timeouts
        assert t.dimse == 12.5
        assert t.connect == 5.0

    def test_node_nested_timeout_over_file_table(self, monkeypatch, full_file: Path):
        monkeypatch.setenv("DWG_NODE_MAIN_TIMEOUTS_CONNECT", "3")
        t = load_settings(full_file).nodes[0].timeouts
        assert (t.connect, t.dimse) == (3.0, 120.0)

    def test_node_tls_from_environment(self, monkeypatch, tmp_path: Path):
        ca = tmp_path / "ca.pem"
        ca.write_text("x")
        monkeypatch.setenv("DWG_NODE_PACS_TLS_ENABLED", "yes")
        monkeypatch.setenv("DWG_NODE_PACS_TLS_CA_FILE", str(ca))
        tls = load_settings(data={"nodes": [NODE]}).nodes[0].tls
        assert tls.enabled and tls.ca_file == str(ca)

    def test_env_name_for_node(self):
        assert env_name_for_node("pacs") == "DWG_NODE_PACS"
        assert env_name_for_node("my-pacs.1") == "DWG_NODE_MY_PACS_1"

    def test_node_name_with_punctuation(self, monkeypatch):
        monkeypatch.setenv("DWG_NODE_MY_PACS_1_PORT", "2000")
        s = load_settings(data=with_node(name="my-pacs.1"))
        assert s.nodes[0].port == 2000

    def test_required_node_setting_from_environment(self, monkeypatch):
        monkeypatch.setenv("DWG_NODE_PACS_HOST", "pacs.example.org")
        node = {k: v for k, v in NODE.items() if k != "host"}
        assert load_settings(data={"nodes": [node]}).nodes[0].host == "pacs.example.org"

    def test_other_nodes_are_not_touched(self, monkeypatch):
        monkeypatch.setenv("DWG_NODE_B_PORT", "2000")
        s = load_settings(data={"nodes": [{**NODE, "default": True}, {**NODE, "name": "b"}]})
        assert [n.port for n in s.nodes] == [104, 2000]

    @pytest.mark.parametrize("text", ["1", "true", "TRUE", "yes", "on", " yes "])
    def test_bool_true(self, monkeypatch, text):
        monkeypatch.setenv("DWG_SERVER_LOG_JSON", text)
        monkeypatch.setenv("DWG_NODE_PACS_FUZZY", text)
        s = load_settings(data={"nodes": [NODE]})
        assert s.server.log_json is True
        assert s.nodes[0].fuzzy is True

    @pytest.mark.parametrize("text", ["0", "false", "False", "no", "off"])
    def test_bool_false(self, monkeypatch, text):
        monkeypatch.setenv("DWG_QIDO_STRICT_ACCEPT", text)
        s = load_settings(data={"qido": {"strict_accept": True}, "nodes": [NODE]})
        assert s.qido.strict_accept is False

    @pytest.mark.parametrize("text", ["maybe", "", "2", "y"])
    def test_bool_invalid(self, monkeypatch, text):
        monkeypatch.setenv("DWG_NODE_PACS_FUZZY", text)
        assert config_error({"nodes": [NODE]}).setting == "nodes[0].fuzzy"

    @pytest.mark.parametrize("text,expected", [("12.5", 12.5), ("7", 7.0), ("1e1", 10.0), (" 3 ", 3.0)])
    def test_float(self, monkeypatch, text, expected):
        monkeypatch.setenv("DWG_NODE_PACS_ACQUIRE_TIMEOUT", text)
        value = load_settings(data={"nodes": [NODE]}).nodes[0].acquire_timeout
        assert value == expected and isinstance(value, float)

    @pytest.mark.parametrize("text", ["soon", "", "5s"])
    def test_float_invalid(self, monkeypatch, text):
        monkeypatch.setenv("DWG_NODE_PACS_TIMEOUTS_DIMSE", text)
        assert config_error({"nodes": [NODE]}).setting == "nodes[0].timeouts.dimse"

    def test_negative_timeout_from_environment(self, monkeypatch):
        monkeypatch.setenv("DWG_NODE_PACS_TIMEOUTS_DIMSE", "-1")
        assert config_error({"nodes": [NODE]}).setting == "nodes[0].timeouts.dimse"

    def test_nan_timeout_from_environment(self, monkeypatch):
        monkeypatch.setenv("DWG_NODE_PACS_TIMEOUTS_DIMSE", "nan")
        err = config_error({"nodes": [NODE]})
        assert err.setting == "nodes[0].timeouts.dimse"

    @pytest.mark.parametrize("text", ["abc", "9000.0", "", "0x1F90"])
    def test_int_invalid(self, monkeypatch, text):
        monkeypatch.setenv("DWG_SERVER_PORT", text)
        assert config_error({"nodes": [NODE]}).setting == "server.port"

    def test_int_out_of_range_from_environment(self, monkeypatch):
        monkeypatch.setenv("DWG_SERVER_PORT", "99999")
        err = config_error({"nodes": [NODE]})
        assert err.setting == "server.port" and "99999" in err.problem

    def test_list_from_environment(self, monkeypatch):
        monkeypatch.setenv("DWG_SERVER_TRUSTED_PROXIES", "10.0.0.1, 192.168.0.0/16,")
        s = load_settings(data={"nodes": [NODE]})
        assert s.server.trusted_proxies == ("10.0.0.1", "192.168.0.0/16")

    def test_invalid_list_entry_from_environment(self, monkeypatch):
        monkeypatch.setenv("DWG_SERVER_TRUSTED_PROXIES", "10.0.0.1,nope")
        assert config_error({"nodes": [NODE]}).setting == "server.trusted_proxies[1]"

    def test_string_setting_from_environment(self, monkeypatch):
        monkeypatch.setenv("DWG_NODE_PACS_RETRIEVE", "move")
        monkeypatch.setenv("DWG_NODE_PACS_CHARSET", "ISO_IR 100")
        n = load_settings(data={"nodes": [NODE]}).nodes[0]
        assert (n.retrieve, n.charset) == ("move", "ISO_IR 100")

    def test_invalid_string_setting_from_environment(self, monkeypatch):
        monkeypatch.setenv("DWG_NODE_PACS_RETRIEVE", "fetch")
        assert config_error({"nodes": [NODE]}).setting == "nodes[0].retrieve"

    # DWG_NODES

    def test_dwg_nodes_replaces_the_file_nodes(self, monkeypatch, full_file: Path):
        monkeypatch.setenv(
            "DWG_NODES",
            json.dumps([{"name": "other", "ae_title": "O", "host": "h", "port": 1, "timeouts": {"dimse": 9}}]),
        )
        s = load_settings(full_file)
        assert [n.name for n in s.nodes] == ["other"]
        assert s.default_node.name == "other"
        assert s.nodes[0].timeouts.dimse == 9.0
        assert s.server.port == 9090  # the other sections still come from the file

    def test_dwg_nodes_with_per_node_override(self, monkeypatch):
        monkeypatch.setenv("DWG_NODES", json.dumps([{**NODE, "name": "my-pacs.1"}]))
        monkeypatch.setenv("DWG_NODE_MY_PACS_1_PORT", "2")
        assert load_settings(data={"nodes": [NODE]}).nodes[0].port == 2

    def test_dwg_nodes_several(self, monkeypatch):
        monkeypatch.setenv("DWG_NODES", json.dumps([{**NODE, "default": True}, {**NODE, "name": "b"}]))
        s = load_settings(data={})
        assert [n.name for n in s.nodes] == ["pacs", "b"]

    @pytest.mark.parametrize("text", ["[{", "not json", "", "[{'name': 'x'}]"])
    def test_dwg_nodes_invalid_json(self, monkeypatch, text):
        monkeypatch.setenv("DWG_NODES", text)
        err = config_error({"nodes": [NODE]})
        assert err.setting == "DWG_NODES"
        assert "JSON" in err.problem

    def test_dwg_nodes_invalid_node(self, monkeypatch):
        monkeypatch.setenv("DWG_NODES", json.dumps([{**NODE, "port": 0}]))
        assert config_error({"nodes": [NODE]}).setting == "nodes[0].port"

    def test_dwg_nodes_empty_list(self, monkeypatch):
        monkeypatch.setenv("DWG_NODES", "[]")
        assert config_error({"nodes": [NODE]}).setting == "nodes"

    def test_dwg_nodes_not_a_list_names_the_variable(self, monkeypatch):
        monkeypatch.setenv("DWG_NODES", json.dumps(NODE))
        assert config_error({"nodes": [NODE]}).setting == "DWG_NODES"
