"""The Alertmanager webhook receiver: firing alerts that name a model request its retraining.

Alertmanager's webhook payload (``version: "4"``) carries a group of alerts; each firing alert
with a ``model`` label asks for one retraining job of that model. Alertmanager re-sends a firing
alert on every ``repeat_interval`` (and after its own restarts), so an alert is acted on once per
firing: it is remembered by fingerprint and ``startsAt`` in the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelloop.schemas import Text
from monitoring.ingest import InputError, format_validation, load_json


class Alert(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    status: Literal["firing", "resolved"]
    labels: dict[str, Text] = Field(default_factory=dict)
    annotations: dict[str, Text] = Field(default_factory=dict)
    """Values stored with the job they start (its reason): :data:`~modelloop.schemas.Text`."""
    starts_at: Text = Field(alias="startsAt")
    fingerprint: Text = Field(min_length=1)


class WebhookPayload(BaseModel):
    """Alertmanager's webhook body (the fields used here; others are allowed)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    version: str = Field(json_schema_extra={"const": "4"})
    """Only version 4 is read (:func:`parse_payload` refuses others, naming the version)."""
    status: Literal["firing", "resolved"]
    receiver: str = ""
    group_key: str = Field(default="", alias="groupKey")
    alerts: list[Alert]


def parse_payload(body: bytes, max_alerts: int) -> WebhookPayload:
    """A webhook body of at most ``max_alerts`` alerts (a 422 naming the setting beyond)."""
    try:
        payload = WebhookPayload.model_validate(load_json(body))
    except ValidationError as exc:
        raise InputError(422, "invalid_alert", format_validation(exc)) from exc
    if len(payload.alerts) > max_alerts:
        raise InputError(422, "invalid_alert", [
            f"alerts: {len(payload.alerts)} alerts in one notification; at most {max_alerts} "
            "(MODELLOOP_MONITOR_MAX_ALERTS_PER_BODY; Alertmanager's webhook_config max_alerts "
            "keeps a notification under it)"])
    if payload.version != "4":
        raise InputError(422, "invalid_alert",
                         [f"version: expected Alertmanager webhook payload version '4', "
                          f"got {payload.version!r}"])
    return payload


def alert_reason(alert: Alert) -> str:
    name = alert.labels.get("alertname", "alert")
    summary = alert.annotations.get("summary") or alert.annotations.get("description") or ""
    return f"Alertmanager: {name}" + (f": {summary}" if summary else "")


@dataclass(frozen=True)
class AlertAction:
    """What one alert asks for: retraining ``model``, or nothing (``model`` None, ``note`` why)."""

    alert: Alert
    model: str | None
    note: str = ""


def plan(payload: WebhookPayload) -> list[AlertAction]:
    out = []
    for alert in payload.alerts:
        if alert.status != "firing":
            out.append(AlertAction(alert, None, "resolved"))
        elif not alert.labels.get("model"):
            out.append(AlertAction(alert, None, "no 'model' label"))
        else:
            out.append(AlertAction(alert, alert.labels["model"]))
    return out
