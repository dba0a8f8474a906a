from pathlib import Path

import pytest

from modelloop.settings import HomeSettings


def test_home_defaults_to_dot_modelloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELLOOP_HOME", raising=False)
    monkeypatch.setenv("HOME", "/root-of-user")  # the user's HOME must not be mistaken for it
    assert HomeSettings().home == Path(".modelloop")


def test_home_from_env_and_registry_below_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELLOOP_HOME", "/srv/ml")
    assert HomeSettings().registry_dir == Path("/srv/ml/registry")
