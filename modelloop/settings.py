"""Settings shared by every process.

Each process has one pydantic-settings class in its package's ``settings.py`` (``training``,
``serving``, ``monitoring``), each with its own env prefix. They all inherit :class:`HomeSettings`,
so ``MODELLOOP_HOME`` is the root of all local state for every process.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class HomeSettings(BaseSettings):
    """Base of every process's settings: where local state lives."""

    model_config = SettingsConfigDict(env_prefix="MODELLOOP_", extra="ignore", populate_by_name=True)

    home: Path = Field(
        default=Path(".modelloop"),
        validation_alias="MODELLOOP_HOME",
    )
    """Root of all local state: the model registry, the sidecar's store, reports, jobs
    (env ``MODELLOOP_HOME``, default ``./.modelloop``)."""

    @property
    def registry_dir(self) -> Path:
        """The model registry's folder, ``$MODELLOOP_HOME/registry``."""
        return self.home / "registry"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; False for ``0.0.0.0``, ``::`` and names:
    whether a server listening on ``host`` is out of reach of other hosts."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
