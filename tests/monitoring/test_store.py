"""The store, run on both engines (SQLite and the real local PostgreSQL) with the same tests."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from modelloop.schemas import PredictionEvent
from monitoring.records import EventRow, JobRecord, JobStatus, Requester, Stored
from monitoring.store import EventStore, Retention, StoreError, open_store, redact_url


def _row(i: int, model: str = "m", version: int = 1, ts: float | None = None,
         features: list[float | None] | None = None) -> EventRow:
    ev = PredictionEvent(
        request_id=f"r{i}", timestamp=1000.0 + i if ts is None else ts, model=model,
        version=version, features=features if features is not None else [float(i), None, 2.5],
        prediction=i % 2, probabilities=[0.25, 0.75], latency_s=0.001 * i,
    )
    return EventRow.from_event(ev, received_at=2000.0)


def _job(job_id: str, model: str = "m", created: float = 1.0) -> JobRecord:
    return JobRecord(id=job_id, model=model, trigger=Requester.policy, kind="local", reason="r",
                     status=JobStatus.started, created_at=created, ended_at=None, handle="", detail="")


def test_insert_then_window_returns_the_newest_arrays_oldest_first(store: EventStore) -> None:
    assert store.insert_events([_row(i) for i in range(10)]) == 10
    win = store.window("m", last_n=4)
    assert len(win) == 4
    np.testing.assert_array_equal(win.ts, [1006.0, 1007.0, 1008.0, 1009.0])
    assert win.features is not None and win.features.shape == (4, 3)
    np.testing.assert_array_equal(win.features[:, 0], [6, 7, 8, 9])
    assert np.isnan(win.features[:, 1]).all()  # None is stored as NaN
    np.testing.assert_allclose(win.probabilities, [[0.25, 0.75]] * 4)
    np.testing.assert_allclose(win.latency_s, [0.006, 0.007, 0.008, 0.009])
    assert np.isnan(win.label).all()
    assert store.count_events("m") == 10 and store.models() == ["m"]


def test_a_resent_batch_is_not_stored_twice(store: EventStore) -> None:
    assert store.insert_events([_row(i) for i in range(5)]) == 5
    # serving re-sends a batch whose acknowledgement it lost (received later), plus new events
    again = [_row(i)._replace(received_at=2500.0) for i in range(3, 8)]
    assert store.insert_batches([again, again[:1]]) == [Stored({"m": 3}), Stored({"m": 0})]
    assert store.count_events() == 8
    assert not any(t.ambiguous for t in store.label_targets([f"r{i}" for i in range(8)]).values())


def test_two_predictions_under_one_request_id_make_it_ambiguous(store: EventStore) -> None:
    # r1 is claimed first (a client chose X-Request-ID); the real r1 comes in a later batch;
    # r2 comes twice in one batch; r3 once, then again with the same content (a re-send)
    assert store.insert_events([_row(1), _row(3)]) == 2
    assert store.set_labels([("r1", 1.0, 1500.0)]) == ["r1"]  # joined before the clash was seen
    out = store.insert_batches([[_row(1, ts=5.0), _row(2), _row(2, model="x"), _row(3), _row(4)]])
    assert out == [Stored({"m": 2}, conflicts=2)]  # r2 and r4 new; r1 and the second r2 not stored
    targets = store.label_targets(["r1", "r2", "r3", "r4"])
    assert {rid: t.ambiguous for rid, t in targets.items()} == {
        "r1": True, "r2": True, "r3": False, "r4": False}
    # no label stays on or joins an ambiguous id; the export and the windows never see one
    assert not targets["r1"].labelled
    assert store.set_labels([("r1", 0.0, 1600.0), ("r2", 1.0, 1600.0), ("r4", 1.0, 1600.0)]) == ["r4"]
    assert store.window("m").labelled.sum() == 1
    assert len(store.labelled_version("m", 1)) == 1
    # the first event of each id stays, for drift and latency (r1 at 1001, not the clash at 5)
    assert store.count_events() == 4 and store.window("m").ts.tolist() == [1001.0, 1002.0, 1003.0, 1004.0]


def test_batches_of_one_commit_see_the_ones_before(store: EventStore) -> None:
    # the second batch re-sends r1 and brings another prediction under r2, both stored by the first
    out = store.insert_batches([[_row(1), _row(2)], [_row(1), _row(2, ts=5.0), _row(3)], [_row(3)]])
    assert out == [Stored({"m": 2}), Stored({"m": 1}, conflicts=1), Stored({"m": 0})]
    targets = store.label_targets(["r1", "r2", "r3"])
    assert [rid for rid, t in targets.items() if t.ambiguous] == ["r2"]
    assert store.window("m").ts.tolist() == [1001.0, 1002.0, 1003.0]


def test_a_failed_insert_stores_nothing_and_the_next_one_works(store: EventStore) -> None:
    with pytest.raises(store.integrity_errors):  # the second batch's event has no mode
        store.insert_batches([[_row(1)], [_row(2)._replace(mode=None)]])
    assert store.count_events() == 0
    assert store.insert_batches([[_row(2), _row(1)]]) == [Stored({"m": 2})]
    assert store.window("m").ts.tolist() == [1001.0, 1002.0]


def test_a_store_made_before_ambiguous_ids_gets_the_column(store_url: tuple[str, str]) -> None:
    url, prefix = store_url
    st = open_store(url, prefix)
    with st._write() as cur:  # the events table as an earlier release made it
        cur.execute(st._sql("DROP TABLE {p}events"))
        cur.execute(st._sql(f"""CREATE TABLE {{p}}events (
            seq {st.seq_type}, request_id TEXT NOT NULL UNIQUE, model TEXT NOT NULL,
            version INTEGER NOT NULL, ts {st.real_type} NOT NULL, mode TEXT NOT NULL,
            features {st.blob_type} NOT NULL, prediction {st.real_type} NOT NULL,
            probabilities {st.blob_type}, latency_s {st.real_type} NOT NULL,
            received_at {st.real_type} NOT NULL, label {st.real_type}, label_ts {st.real_type})"""))
    st.close()
    st = open_store(url, prefix)
    try:
        assert st.insert_events([_row(1)]) == 1
        assert st.insert_batches([[_row(1, ts=5.0)]]) == [Stored({"m": 0}, conflicts=1)]
        assert st.label_targets(["r1"])["r1"].ambiguous
    finally:
        st.close()


def test_a_store_made_with_the_two_ingest_indexes_gets_the_one_that_replaced_them(
        store_url: tuple[str, str]) -> None:
    """A store made before (an index by version and arrival, one by model and time) has the
    (model, version, ts) index in their place once opened again, by two replicas at once, and
    its events are read."""
    url, prefix = store_url
    st = open_store(url, prefix)
    with st._write() as cur:  # the indexes as an earlier release made them
        cur.execute(st._sql("DROP INDEX {p}events_mvt"))
        cur.execute(st._sql("CREATE INDEX {p}events_mvs ON {p}events (model, version, seq)"))
        cur.execute(st._sql("CREATE INDEX {p}events_mts ON {p}events (model, ts)"))
    st.insert_events([_row(i, version=1 + i % 2) for i in range(6)])
    st.close()

    def indexes(store: EventStore) -> set[str]:
        with store._read() as cur:
            if store.dialect == "sqlite":
                cur.execute(store._sql("SELECT name FROM sqlite_master WHERE type = 'index' "
                                       "AND tbl_name = '{p}events'"))
            else:
                cur.execute(store._sql("SELECT indexname FROM pg_indexes WHERE tablename = '{p}events'"))
            return {r[0].removeprefix(prefix) for r in cur.fetchall() if "autoindex" not in r[0]}

    opened: list[EventStore] = []
    # two replicas opening it at once: one migrates, then the other finds it done (on PostgreSQL,
    # each building the index and then dropping the old ones would deadlock the other)
    both = [threading.Thread(target=lambda: opened.append(open_store(url, prefix))) for _ in range(2)]
    for t in both:
        t.start()
    for t in both:
        t.join(60)
    try:
        assert len(opened) == 2
        for st in opened:
            assert {"events_mvt", "events_labelled"} <= indexes(st)
            assert not {"events_mvs", "events_mts"} & indexes(st)
            assert st.window("m", last_n=3).ts.tolist() == [1003.0, 1004.0, 1005.0]
    finally:
        for st in opened:
            st.close()


def test_window_filters_by_version_and_time(store: EventStore) -> None:
    store.insert_events([_row(i, version=1 + i % 2) for i in range(10)])
    assert len(store.window("m", version=2)) == 5
    assert set(store.window("m", version=2).version.tolist()) == {2}
    assert len(store.window("m", since=1005.0)) == 5
    assert store.versions("m") == [1, 2]
    assert len(store.window("other")) == 0


def test_the_newest_events_over_versions_are_those_of_every_version_merged(store: EventStore) -> None:
    """A model's newest events over its versions (the check's window, its latencies) and each
    version's own, against the same selection made in numpy: four versions whose events
    interleave in time (a canary, a champion, one retired, one with a single old event), stored
    out of time order."""
    rng = np.random.default_rng(7)
    versions = rng.choice([1, 2, 3, 4], size=400, p=[0.05, 0.7, 0.249, 0.001])
    ts = 1000.0 + rng.permutation(400) * 0.5  # distinct, not in the order of arrival
    ts[versions == 3] -= 150.25  # retired: its events end before the others (still distinct)
    rows = [_row(i, version=int(v), ts=float(t)) for i, (v, t) in enumerate(zip(versions, ts, strict=True))]
    for i in range(0, len(rows), 50):
        store.insert_batches([rows[i:i + 50]])
    for since in (None, 1000.0, 1150.0, 1199.0):
        kept = ts >= (since or 0.0)
        assert store.versions("m", since) == sorted(set(versions[kept].tolist()))
        for last_n in (None, 0, 1, 7, 50, 399, 1000):
            newest = np.flatnonzero(kept)[np.argsort(-ts[kept])][:last_n]  # their rows, newest first
            win = store.window("m", last_n=last_n, since=since, features=False)
            assert win.ts.tolist() == ts[newest[::-1]].tolist()
            assert win.version.tolist() == versions[newest[::-1]].tolist()
            if last_n:
                np.testing.assert_allclose(store.latencies("m", since or 0.0, last_n), 0.001 * newest)
            for v in (1, 3, 4):
                mine = np.sort(ts[kept & (versions == v)])[::-1][:last_n][::-1]
                assert store.window("m", version=v, last_n=last_n, since=since).ts.tolist() == mine.tolist()


def test_a_window_mixing_feature_widths_needs_one_version(store: EventStore) -> None:
    store.insert_events([_row(1, version=1), _row(2, version=2, features=[1.0, 2.0])])
    with pytest.raises(ValueError, match="ask for one version"):
        store.window("m")
    assert store.window("m", version=2).features.shape == (1, 2)


def test_labels_join_once_and_report_what_they_point_at(store: EventStore) -> None:
    store.insert_events([_row(i, version=3) for i in range(4)])
    targets = store.label_targets(["r1", "r2", "nope"])
    assert set(targets) == {"r1", "r2"}
    assert (targets["r1"].model, targets["r1"].version, targets["r1"].labelled) == ("m", 3, False)
    assert store.set_labels([("r1", 1.0, 1500.0), ("r2", 0.0, 1600.0)]) == ["r1", "r2"]
    assert store.set_labels([("r1", 0.0, 1700.0)]) == []  # labelled already: first label stays
    assert store.label_targets(["r1"])["r1"].labelled
    win = store.window("m")
    np.testing.assert_array_equal(win.label[:3], [np.nan, 1.0, 0.0])
    np.testing.assert_array_equal(win.label_ts[1:3], [1500.0, 1600.0])
    assert len(store.labelled_version("m", 3)) == 2


def test_retention_by_age_and_by_count(store: EventStore) -> None:
    store.insert_events([_row(i) for i in range(10)])
    assert store.delete_older(1003.0) == 3
    assert store.keep_newest(4) == 3
    assert store.window("m").ts.tolist() == [1006.0, 1007.0, 1008.0, 1009.0]
    assert store.keep_newest(10) == 0


def test_sample_shares_keep_the_largest_per_model_and_hour_and_age_out(store: EventStore) -> None:
    store.note_share("m", 10, 0.25)
    store.note_share("m", 10, 0.125)  # a smaller share later in the hour: the largest stays
    store.note_share("m", 11, 0.0625)
    store.note_share("m", 11, 0.5)
    store.note_share("x", 12, 1.0)
    assert sorted(store.sample_shares(0)) == [("m", 10, 0.25), ("m", 11, 0.5), ("x", 12, 1.0)]
    assert sorted(store.sample_shares(11)) == [("m", 11, 0.5), ("x", 12, 1.0)]
    store.retain(cutoff_ts=11 * 3600.0 + 5)  # hour 10 is past the retention age
    assert sorted(store.sample_shares(0)) == [("m", 11, 0.5), ("x", 12, 1.0)]


def test_one_active_job_per_model_and_one_job_per_name(store: EventStore) -> None:
    assert store.try_start_job(_job("j1")) is None
    assert store.try_start_job(_job("j2")) == "job j1 of model 'm' is still active"
    assert store.try_start_job(_job("k1", model="other")) is None
    store.update_job("j1", JobStatus.running, handle="123")
    store.update_job("j1", JobStatus.succeeded, ended_at=5.0)
    assert store.try_start_job(_job("j1")) == "job j1 already ran for this window (succeeded)"
    assert store.try_start_job(_job("j3", created=2.0)) is None
    jobs = store.jobs("m")
    assert [(j.id, j.status, j.active) for j in jobs] == [("j3", "started", True),
                                                          ("j1", "succeeded", False)]
    assert jobs[1].handle == "123" and jobs[1].ended_at == 5.0
    assert [j.id for j in store.jobs(active_only=True)] == ["j3", "k1"]  # newest first


def test_jobs_are_read_back_as_enums_and_a_state_that_is_none_is_not_stored(
        store: EventStore) -> None:
    assert store.try_start_job(_job("j1")) is None
    (job,) = store.jobs("m")
    assert (job.trigger, job.status) == (Requester.policy, JobStatus.started)
    assert type(job.trigger) is Requester and type(job.status) is JobStatus
    with pytest.raises(ValueError, match="'done' is not a valid JobStatus"):
        store.update_job("j1", "done")  # type: ignore[arg-type]
    assert store.jobs("m")[0].status is JobStatus.started


def test_two_stores_racing_for_a_model_start_one_job(store_url: tuple[str, str]) -> None:
    # two replicas sharing the database ask for jobs of the same model at the same moment
    url, prefix = store_url
    stores = [open_store(url, prefix) for _ in range(2)]
    results: list[str | None] = []
    barrier = threading.Barrier(2)

    def ask(st: EventStore, job_id: str) -> None:
        barrier.wait()
        results.append(st.try_start_job(_job(job_id)))

    threads = [threading.Thread(target=ask, args=(st, f"j{i}")) for i, st in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r is None for r in results) == [False, True]
    assert len(stores[0].jobs(active_only=True)) == 1
    for st in stores:
        st.close()


def test_alerts_are_remembered_by_fingerprint_and_start(store: EventStore) -> None:
    first = "2024-01-01T00:00:00Z"
    assert store.first_seen_alerts([("abc", first), ("abc", first), ("x", first)], 1.0) == [
        True, False, True]
    assert store.first_seen_alerts([("abc", first)], 2.0) == [False]
    assert store.first_seen_alerts([("abc", "2024-01-02T00:00:00Z")], 3.0) == [True]  # fired again


def test_retention_forgets_alerts_not_seen_for_the_age_and_beyond_the_cap(store: EventStore) -> None:
    store.first_seen_alerts([(f"fp{i}", "s") for i in range(10)], 1.0)
    store.first_seen_alerts([("fp0", "s")], 50.0)  # still firing: Alertmanager re-sent it
    for i in range(5):
        store.first_seen_alerts([(f"new{i}", "s")], 60.0 + i)
    assert store.retain(cutoff_ts=10.0, max_alerts=6) == Retention(alerts=9)
    assert store.first_seen_alerts([("fp0", "s"), ("fp1", "s")], 70.0) == [False, True]
    assert store.retain(cutoff_ts=10.0, max_alerts=2) == Retention(alerts=5)  # new0..4
    assert store.first_seen_alerts([("fp0", "s"), ("fp1", "s"), ("new4", "s")], 80.0) == [
        False, False, True]


def test_committed_events_survive_reopening(store_url: tuple[str, str]) -> None:
    url, prefix = store_url
    first = open_store(url, prefix)
    first.insert_events([_row(i) for i in range(100)])
    second = open_store(url, prefix)  # another process would see the same
    assert second.count_events() == 100
    first.close()
    second.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # a scheme that is neither engine
        ("mysql://x", "unsupported store URL 'mysql://x': use sqlite:///PATH or postgresql://..."),
        # nothing listens there; the password must not leak into the message
        ("postgresql://u:secret@127.0.0.1:1/db",
         "cannot connect to PostgreSQL store postgresql://u:***@127.0.0.1:1/db"),
    ],
)
def test_bad_store_urls_are_named(url: str, message: str) -> None:
    with pytest.raises(StoreError) as err:
        open_store(url)
    assert str(err.value).startswith(message)
    assert "secret" not in str(err.value)


def test_redact_url_keeps_urls_without_password() -> None:
    assert redact_url("postgresql://postgres@h:5432/db") == "postgresql://postgres@h:5432/db"
    assert redact_url("postgresql://a:b@h/db") == "postgresql://a:***@h/db"


def test_sqlite_store_uses_wal(tmp_path) -> None:
    st = open_store(f"sqlite:///{tmp_path / 'x.db'}")
    assert st._writer().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    st.close()


def test_a_checks_time_window_reads_are_bounded_and_take_the_newest(store: EventStore) -> None:
    """The latencies and a version's labelled events of the time window: the newest ``limit``
    of those not older than ``since``, however many events the window holds."""
    store.insert_events([_row(i) for i in range(40)])
    np.testing.assert_allclose(store.latencies("m", since=1010.0, limit=5), [0.039, 0.038, 0.037, 0.036, 0.035])
    assert len(store.latencies("m", since=1035.0, limit=100)) == 5
    assert len(store.latencies("other", since=0.0, limit=100)) == 0
    assert store.set_labels([(f"r{i}", 1.0, 1500.0) for i in (2, 11, 20, 30, 31)]) == ["r2", "r11", "r20", "r30", "r31"]
    win = store.labelled_version("m", 1, since=1010.0, limit=2, features=False)
    assert win.ts.tolist() == [1030.0, 1031.0] and win.features is None and win.labelled.all()
    assert store.labelled_version("m", 1, since=1010.0, features=False).ts.tolist() == [1011.0, 1020.0, 1030.0, 1031.0]


def test_the_labelled_read_goes_through_the_index_of_labelled_events(tmp_path: Path) -> None:
    """SQLite's plan for the statements the store runs (traced, values bound) for a version's
    labelled events uses the partial index (its rows are the labelled events only), and for the
    latencies and the windows the (model, version, ts) index, neither a sort of the whole table
    (nor the merge of a model's versions: each version's range is read in order)."""
    store = open_store(f"sqlite:///{tmp_path / 'plan.db'}")
    ran: list[str] = []
    try:
        store._reader().set_trace_callback(ran.append)
        store.labelled_version("m", 1, since=0.0, limit=10, features=False)
        store.insert_events([_row(1, version=1), _row(2, version=2)])
        store.latencies("m", since=0.0, limit=10)
        store.window("m", last_n=10, features=False)
        store._reader().set_trace_callback(None)
        plans = []
        with store._read() as cur:
            for sql in ran:
                cur.execute(f"EXPLAIN QUERY PLAN {sql}")
                plans.append(" ".join(str(r) for r in cur.fetchall()))
    finally:
        store.close()
    labelled, *others = plans
    assert "events_labelled" in labelled and "TEMP B-TREE" not in labelled, labelled
    assert len(others) == 6, ran  # latencies and window: the versions, then the range of each of the two
    for plan in others:
        assert "events_mvt" in plan and "TEMP B-TREE" not in plan and "SCAN" not in plan.replace(
            "SCAN v", ""), plan


def test_events_without_probabilities_and_with_string_features_are_stored(store: EventStore) -> None:
    """A regressor's events (no probabilities: NULL) and a categorical model's rows (JSON text)
    go through each engine's insert, in order, with what they hold."""
    from monitoring.records import pack_row

    rows = [_row(i)._replace(probabilities=None, prediction=0.5 * i) for i in range(3)]
    rows += [_row(i)._replace(request_id=f"c{i}", model="shop", features=pack_row([40.0, "north", None]))
             for i in range(2)]
    assert store.insert_batches([rows]) == [Stored({"m": 3, "shop": 2})]
    win = store.window("m", features=False)
    assert win.prediction.tolist() == [0.0, 0.5, 1.0]
    shop = store.window("shop")
    assert shop.features is not None and shop.features.tolist() == [[40.0, "north", None]] * 2
