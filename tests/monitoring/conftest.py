"""Fixtures of the sidecar's tests: a fitted model, a registry with it, stores of both engines."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from modelloop.synthetic import SyntheticTask
from monitoring.store import EventStore, open_store
from tests.monitoring.helpers import TrainedModel

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def task() -> SyntheticTask:
    return SyntheticTask(seed=0)


@pytest.fixture(scope="session")
def trained(task: SyntheticTask) -> TrainedModel:
    return TrainedModel.fit(task)


@pytest.fixture
def registered(home: Path, trained: TrainedModel) -> TrainedModel:
    """The model registered (and promoted) as ``churn`` v1 in this test's MODELLOOP_HOME, its
    gate metric PR-AUC (``modelloop train --gate-metric pr_auc``)."""
    trained.register(home / "registry", gate_metric="pr_auc")
    return trained


def _pg_available() -> bool:
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except psycopg.Error:
        return False
    return True


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A store URL and a table prefix unique to this test; the tables are dropped after."""
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'events.db'}", prefix
        return
    if not _pg_available():
        pytest.fail(f"PostgreSQL is not running at {PG_URL}: scripts/ci_services.sh (run by make test) starts it")
    yield PG_URL, prefix
    cleanup = open_store(PG_URL, prefix)
    cleanup.drop_schema()
    cleanup.close()


@pytest.fixture
def store(store_url: tuple[str, str]) -> Iterator[EventStore]:
    url, prefix = store_url
    st = open_store(url, prefix)
    yield st
    st.close()
