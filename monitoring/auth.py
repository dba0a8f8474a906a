"""Who may steer the sidecar: role keys checked at the edge of every route but health and metrics.

Four roles, each a bearer key (``Authorization: Bearer <key>``, the scheme in any case):

- ``admin`` (``MODELLOOP_MONITOR_API_KEY``): every route, among them retraining, checks, status,
  drift reports, jobs and the export of labelled features;
- ``ingest`` (``MODELLOOP_MONITOR_INGEST_KEY``): ``POST /events`` only (what serving holds);
- ``feedback`` (``MODELLOOP_MONITOR_FEEDBACK_KEY``): ``POST /feedback`` only, so a label provider
  can neither start a retraining nor read features;
- ``alertmanager`` (``MODELLOOP_MONITOR_ALERTMANAGER_KEY``): ``POST /alertmanager`` only.

Without an admin key the sidecar is open and listens on loopback only (:func:`check_exposure`).
A missing or unknown key is a 401, a key of another role a 403; both are counted.

Example::

    keys = RoleKeys.from_settings(settings)
    keys.role_of(request.headers.get("authorization"))   # "admin", "ingest", ... or None
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from typing import Literal

from monitoring.settings import MonitorSettings

Role = Literal["admin", "ingest", "feedback", "alertmanager"]
ROLES: tuple[Role, ...] = ("admin", "ingest", "feedback", "alertmanager")


class ExposureError(Exception):
    """The sidecar would listen beyond loopback with no key: start-up stops, saying why."""


@dataclass(frozen=True)
class RoleKeys:
    """The configured key of each role (roles without a key are left out)."""

    keys: dict[Role, bytes]

    @classmethod
    def from_settings(cls, settings: MonitorSettings) -> RoleKeys:
        found = {"admin": settings.api_key, "ingest": settings.ingest_key,
                 "feedback": settings.feedback_key, "alertmanager": settings.alertmanager_key}
        return cls({role: key.get_secret_value().encode() for role, key in found.items()  # type: ignore[misc]
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


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; False for ``0.0.0.0``, ``::`` and names."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: MonitorSettings) -> None:
    """Refuse to listen beyond loopback without an admin key, unless explicitly allowed."""
    if settings.api_key is None and not is_loopback(settings.host) \
            and not settings.allow_unauthenticated:
        raise ExposureError(
            f"refusing to listen on {settings.host} without a key: anyone who reaches it could "
            "read stored features and labels and start retraining. Set MODELLOOP_MONITOR_API_KEY "
            "(and MODELLOOP_MONITOR_INGEST_KEY / _FEEDBACK_KEY for serving and label providers), "
            "listen on 127.0.0.1, or set MODELLOOP_MONITOR_ALLOW_UNAUTHENTICATED=true behind a "
            "gateway that authenticates")
