"""Unit tests read settings from their own data only: no DWG_* variable of the machine running them
may leak in."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DWG_"):
            monkeypatch.delenv(name)


@pytest.fixture
def auth_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings of other features, loaded without an [auth] section (auth's own: test_auth.py)."""
    monkeypatch.setenv("DWG_AUTH_ENABLED", "false")
