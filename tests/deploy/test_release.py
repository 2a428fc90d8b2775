"""Releases: one version everywhere, a changelog entry for it, and a wheel that builds from a clean
checkout and works once installed.

The wheel is built offline (``pip wheel --no-deps --no-build-isolation``) from a fresh ``git clone``
of this repository, so nothing ignored by git (.venv, build/, *.egg-info, caches) can make it pass.
It is then installed into an empty directory and run from there, away from the source tree: its
command line loads a settings file and its app serves the OpenAPI document from package data.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gateway
from tests.deploy.support import (
    COMPOSE,
    EXAMPLE_CONFIG,
    K8S,
    ROOT,
    build_wheel,
    dockerfile_instructions,
    project_version,
    yaml_documents,
)
from tests.support.realpacs import require_binary

CHANGELOG = ROOT / "CHANGELOG.md"
IMAGE = "dicomweb-gateway"


def image_tags() -> dict[str, str]:
    """Where the deployment files name the gateway's own image, and the tag they use."""
    tags: dict[str, str] = {}
    for label in (i.args for i in dockerfile_instructions() if i.keyword == "LABEL"):
        found = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', label)
        if found:
            tags["deploy/Dockerfile (label)"] = found.group(1)
    [compose] = yaml_documents(COMPOSE)
    tags["deploy/compose.yaml"] = compose["services"]["gateway"]["image"].partition(":")[2]
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml_documents(path):
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []):
                name, _, tag = c["image"].rpartition(":")
                if name.rsplit("/", 1)[-1] == IMAGE:
                    tags[f"{path.relative_to(ROOT)} ({c['name']})"] = tag
    return tags


def test_the_version_is_the_same_everywhere() -> None:
    version = project_version()
    assert gateway.__version__ == version, "gateway/__init__.py and pyproject.toml"
    openapi = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    assert openapi["info"]["version"] == version
    tags = image_tags()
    assert len(tags) >= 4, f"the image is named in the Dockerfile, compose and both Kubernetes modes: {tags}"
    assert {where: tag for where, tag in tags.items() if tag != version} == {}, f"expected {version}"


def test_the_changelog_has_an_entry_for_the_version() -> None:
    version = project_version()
    text = CHANGELOG.read_text()
    headings = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?\s*$", text, re.M)
    assert headings, "CHANGELOG.md has '## [version] - YYYY-MM-DD' sections"
    releases = [(v, d) for v, d in headings if v != "Unreleased"]
    assert all(d for _, d in releases), "every release has its date"
    for _, d in releases:
        datetime.date.fromisoformat(d)
    if ".dev" in version:
        assert headings[0][0] == "Unreleased", f"{version} is in development: changes go under [Unreleased]"
    else:
        assert releases and releases[0][0] == version, \
            f"the newest release in CHANGELOG.md must be {version} (found {releases[:1]})"
    dates = [d for _, d in releases]
    assert dates == sorted(dates, reverse=True), "newest first"


# ------------------------------------------------------------------------------------------- wheel


def git(*args: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def clean_checkout(dest: Path) -> Path:
    """This repository as a fresh clone holds it: ``git clone`` of HEAD, then the working tree's
    uncommitted changes laid over it (changed and deleted tracked files, new files git does not
    ignore), so that a run before a commit checks what the commit will hold. In CI the working tree
    is HEAD and nothing is laid over. Files git ignores never come along."""
    require_binary(shutil.which("git") or "/usr/bin/git", "git")
    if not (ROOT / ".git").exists():
        pytest.fail(f"{ROOT} is not a git checkout", pytrace=False)
    git("clone", "-q", "--no-hardlinks", str(ROOT), str(dest), cwd=dest.parent)
    changed = git("ls-files", "-z", "--modified", "--others", "--exclude-standard").split("\0")
    for rel in filter(None, changed):
        src, dst = ROOT / rel, dest / rel
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        if src.is_symlink() or src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst, follow_symlinks=False)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the checkout it was built from)."""
    base = tmp_path_factory.mktemp("release")
    checkout = clean_checkout(base / "checkout")
    return build_wheel(checkout, base / "dist"), checkout


def test_the_wheel_holds_the_package_its_data_and_the_command(wheel: tuple[Path, Path]) -> None:
    path, checkout = wheel
    version = project_version()
    assert path.name == f"dicomweb_gateway-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        dist_info = f"dicomweb_gateway-{version}.dist-info"
        assert {n.split("/")[0] for n in names} == {"gateway", dist_info}, "nothing but the package"
        modules = {p.relative_to(checkout).as_posix() for p in (checkout / "gateway").rglob("*.py")}
        assert modules <= names, f"missing: {sorted(modules - names)[:10]}"
        assert "gateway/py.typed" in names
        document = z.read("gateway/openapi.json")
        assert document == (checkout / "openapi" / "openapi.json").read_bytes(), \
            "the packaged OpenAPI document is openapi/openapi.json itself"
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
        assert re.search(r"^dicomweb-gateway\s*=\s*gateway\.cli:main$", entry_points, re.M), entry_points
        metadata = z.read(f"{dist_info}/METADATA").decode()
        assert f"\nVersion: {version}\n" in metadata


def test_the_installed_wheel_runs_away_from_the_source_tree(wheel: tuple[Path, Path], tmp_path: Path) -> None:
    path, _ = wheel
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                           "--disable-pip-version-check", "--target", str(target), str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    script = f"""
import sys
sys.path.insert(0, {str(target)!r})
import gateway
assert gateway.__file__.startswith({str(target)!r}), gateway.__file__
from gateway.cli import main
from gateway.app import create_app
from gateway.config import load_settings
from starlette.testclient import TestClient
response = TestClient(create_app(load_settings({str(EXAMPLE_CONFIG)!r}))).get("/openapi.json")
print(response.status_code, response.json()["info"]["version"])
sys.argv = ["dicomweb-gateway", "check-config", "--config", {str(EXAMPLE_CONFIG)!r}]
main()
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == f"200 {project_version()}", run.stdout
    assert lines[1].startswith("configuration OK"), run.stdout
