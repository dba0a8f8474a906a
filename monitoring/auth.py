"""Who may steer the sidecar: role keys checked at the edge of every route but health and metrics.

Four roles, each a bearer key (``Authorization: Bearer <key>``, the scheme in any case):

- ``admin`` (``MODELLOOP_MONITOR_API_KEY``): every route, among them retraining, checks, status,
  drift reports, jobs and the export of labelled features;
- ``ingest`` (``MODELLOOP_MONITOR_INGEST_KEY``): ``POST /events`` only (what serving holds);
- ``feedback`` (``MODELLOOP_MONITOR_FEEDBACK_KEY``): ``POST /feedback`` only, so a label provider
  can neither start a retraining nor read features;
- ``alertmanager`` (``MODELLOOP_MONITOR_ALERTMANAGER_KEY``): ``POST /alertmanager`` only.

Without an admin key the sidecar is open and listens on loopback only; a role key needs the
admin key beside it, and each role its own key (:func:`check_exposure`, at start-up only: a
client holding one role's key needs no other). A missing or unknown key is a 401, a key of
another role a 403; both are counted.

Example::

    keys = RoleKeys.from_settings(settings)
    keys.role_of(request.headers.get("authorization"))   # "admin", "ingest", ... or None
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Literal

from modelloop.settings import is_loopback
from monitoring.settings import MonitorSettings

Role = Literal["admin", "ingest", "feedback", "alertmanager"]
ROLES: tuple[Role, ...] = ("admin", "ingest", "feedback", "alertmanager")
KEY_SETTINGS: dict[Role, str] = {"admin": "api_key", "ingest": "ingest_key",
                                 "feedback": "feedback_key", "alertmanager": "alertmanager_key"}
"""The setting holding each role's key (``MODELLOOP_MONITOR_<SETTING>``)."""


class ExposureError(Exception):
    """The sidecar's address and keys would leave it open (beyond loopback with no key, a role
    key without the admin key, one key for two roles): start-up stops, saying why."""


@dataclass(frozen=True)
class RoleKeys:
    """The configured key of each role (roles without a key are left out)."""

    keys: dict[Role, bytes]

    @classmethod
    def from_settings(cls, settings: MonitorSettings) -> RoleKeys:
        found = {role: getattr(settings, name) for role, name in KEY_SETTINGS.items()}
        return cls({role: key.get_secret_value().encode() for role, key in found.items()
                    if key is not None})

    @property
    def enabled(self) -> bool:
        return "admin" in self.keys

    def role_of(self, authorization: str | None) -> Role | None:
        """The role whose key the header carries, or None (no header, another scheme, no match).
        Every configured key is compared in constant time, so timing tells nothing."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = token.strip().encode()
        found: Role | None = None
        for role, key in self.keys.items():
            if hmac.compare_digest(presented, key) and found is None:
                found = role
        return found

    def denial(self, authorization: str | None, allowed: Role) -> str | None:
        """None when the header may use a route of role ``allowed`` (admin may use all), else
        the reason: ``missing_key``, ``wrong_key`` or ``wrong_role``."""
        if not self.enabled:
            return None
        role = self.role_of(authorization)
        if role == "admin" or role == allowed:
            return None
        if role is not None:
            return "wrong_role"
        return "missing_key" if not authorization else "wrong_key"


def _env(role: Role) -> str:
    return f"MODELLOOP_MONITOR_{KEY_SETTINGS[role].upper()}"


def check_exposure(settings: MonitorSettings) -> None:
    """Refuse to start a sidecar whose keys leave it open: a role key without the admin key (the
    sidecar would be open to all), one key for two roles (it would carry both), or listening
    beyond loopback without an admin key, unless explicitly allowed."""
    keys = RoleKeys.from_settings(settings)
    if not keys.enabled and keys.keys:
        raise ExposureError("settings: MODELLOOP_MONITOR_API_KEY (the admin key) is required when "
                            "a role key (ingest, feedback, alertmanager) is set")
    seen: dict[bytes, Role] = {}
    for role, key in keys.keys.items():
        if key in seen:
            raise ExposureError(f"settings: {_env(role)} is the same key as {_env(seen[key])}; "
                                f"give each role its own key (e.g. `openssl rand -hex 32`)")
        seen[key] = role
    if settings.api_key is None and not is_loopback(settings.host) \
            and not settings.allow_unauthenticated:
        raise ExposureError(
            f"refusing to listen on {settings.host} without a key: anyone who reaches it could "
            "read stored features and labels and start retraining. Set MODELLOOP_MONITOR_API_KEY "
            "(and MODELLOOP_MONITOR_INGEST_KEY / _FEEDBACK_KEY for serving and label providers), "
            "listen on 127.0.0.1, or set MODELLOOP_MONITOR_ALLOW_UNAUTHENTICATED=true behind a "
            "gateway that authenticates")
