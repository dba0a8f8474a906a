"""Validation at the boundary: event batches and feedback, each bad case with its exact error."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelloop.registry import Registry
from modelloop.schemas import PackedMatrix
from monitoring.ingest import (
    GroupCommitWriter,
    InputError,
    ModelCatalog,
    ParsedEvents,
    Sampled,
    parse_events,
    parse_feedback,
    resolve_label,
)
from monitoring.records import Stored
from monitoring.store import open_store
from tests.monitoring.helpers import TrainedModel


def event(**over: Any) -> dict[str, Any]:
    ev = {"request_id": "r1", "timestamp": 1.0, "model": "churn", "version": 1,
          "features": [0.5] * 20, "prediction": 1, "probabilities": [0.3, 0.7], "latency_s": 0.01}
    ev.update(over)
    return ev


def body(*events: dict[str, Any]) -> bytes:
    return json.dumps({"events": list(events)}).encode()


@pytest.fixture
def catalog(registered: TrainedModel, home: Path) -> ModelCatalog:
    return ModelCatalog(Registry(home / "registry"))


def test_a_valid_batch_becomes_rows(catalog: ModelCatalog) -> None:
    rows = parse_events(body(event(), event(request_id="r2", features=[None] * 20)), catalog, 5.0).rows
    assert [r.request_id for r in rows] == ["r1", "r2"]
    assert rows[0].received_at == 5.0 and rows[0].version == 1


@pytest.mark.parametrize(
    ("payload", "status", "reason", "error"),
    [
        # not JSON at all
        (b"{nope", 400, "invalid_json", "body: invalid JSON (key must be a string "
                                        "at line 1 column 2)"),
        # NaN and Infinity are not JSON (pydantic's own parser would take them): a missing
        # feature is null
        (body(event()).replace(b"0.5,", b"NaN,", 1), 400, "invalid_json",
         "body: invalid JSON (NaN is not JSON (a missing value is null) at line 1 column 97)"),
        (body(event()).replace(b"0.5,", b"-Infinity,", 1), 400, "invalid_json",
         "body: invalid JSON (Infinity is not JSON (a missing value is null) at line 1 column 98)"),
        # no events key
        (b"{}", 422, "invalid_event", "events: Field required"),
        # an empty batch
        (b'{"events": []}', 422, "invalid_event", "events: List should have at least 1 item "
                                                  "after validation, not 0"),
        # the fourth event has version 0
        (body(event(), event(request_id="b"), event(request_id="c"), event(request_id="d", version=0)),
         422, "invalid_event", "events[3].version: Input should be greater than or equal to 1"),
        # a feature is a string
        (body(event(features=[0.5] * 19 + ["x"])), 422, "invalid_event",
         "events[0].features[19]: Input should be a valid number"),
        # negative latency
        (body(event(latency_s=-1)), 422, "invalid_event",
         "events[0].latency_s: Input should be greater than or equal to 0"),
        # a latency of more than a day (1e300 made every latency quantile meaningless)
        (body(event(latency_s=1e300)), 422, "invalid_event",
         "events[0].latency_s: Input should be less than or equal to 86400"),
        # a model the registry does not have
        (body(event(model="nope")), 422, "unknown_model",
         "events[0].model: model 'nope' is not registered under {registry}"),
        # a version the registry does not have
        (body(event(version=9)), 422, "unknown_model", "events[0].model: model 'churn' has no version 9"),
        # one feature short
        (body(event(features=[0.5] * 19)), 422, "wrong_shape",
         "events[0].features: expected 20 values for churn v1, got 19"),
        # an infinite feature (1e999 overflows to inf)
        (json.dumps({"events": [event()]}).encode().replace(b"0.5,", b"1e999,", 1), 422,
         "wrong_shape", "events[0].features: values must be numbers within float32 range "
                        "(|x| <= 3.4e38) or null"),
        # a class index the model does not have
        (body(event(prediction=2)), 422, "wrong_shape",
         "events[0].prediction: expected a class index 0..1 for churn v1, got 2"),
        # a fractional class index
        (body(event(prediction=0.5)), 422, "wrong_shape",
         "events[0].prediction: expected a class index 0..1 for churn v1, got 0.5"),
        # probabilities of three classes
        (body(event(probabilities=[0.2, 0.3, 0.5])), 422, "wrong_shape",
         "events[0].probabilities: expected 2 values for churn v1, got 3"),
        # a prediction that is not the most probable class of its probabilities
        (body(event(), event(request_id="r2", prediction=0)), 422, "wrong_shape",
         "events[1].prediction: class 0 is not the most probable class of the event's "
         "probabilities (class 1: 0.7; class 0: 0.3)"),
        # a key beside the events: a body is one form or the other, nothing else
        (b'{"x": 1, "events": ' + json.dumps([event()]).encode() + b"}", 422, "invalid_event",
         "x: Extra inputs are not permitted"),
        (b'{"x": 1, "columns": []}', 422, "invalid_event", "events: Field required"),
    ],
)
def test_bad_batches_are_rejected_whole_naming_the_event(
        catalog: ModelCatalog, home: Path, payload: bytes, status: int, reason: str, error: str) -> None:
    with pytest.raises(InputError) as err:
        parse_events(payload, catalog, 0.0)
    assert (err.value.status, err.value.reason) == (status, reason)
    assert str(err.value) == error.format(registry=home / "registry")


def test_a_bad_batch_counts_all_its_events_and_lists_each_error(catalog: ModelCatalog) -> None:
    with pytest.raises(InputError) as err:
        parse_events(body(event(), event(request_id="x", version=0), event(request_id="y", version=-1)),
                     catalog, 0.0)
    assert err.value.rejected == 3
    assert err.value.body()["errors"] == [
        "events[1].version: Input should be greater than or equal to 1",
        "events[2].version: Input should be greater than or equal to 1"]


def columns(n: int = 3, **over: Any) -> dict[str, Any]:
    """A column group of one request of ``n`` rows to churn v1 (what serving sends)."""
    group = {"model": "churn", "version": 1, "mode": "realtime", "request_ids": ["req"],
             "first_row": [0], "rows": [n], "timestamp": [1.0], "latency_s": [0.01],
             "features": [[0.5] * 20 for _ in range(n)], "prediction": [1] * n,
             "probabilities": [[0.3, 0.7]] * n}
    group.update(over)
    return group


def column_body(*groups: dict[str, Any]) -> bytes:
    return json.dumps({"columns": list(groups)}).encode()


def packed(x: Any) -> dict[str, Any]:
    """A matrix in the packed form serving sends (float32 bytes, base64)."""
    return PackedMatrix.pack(np.asarray(x, dtype=np.float32))


def test_packed_columns_store_what_the_list_form_stores(catalog: ModelCatalog) -> None:
    x = np.random.default_rng(3).normal(size=(4, 20)).astype(np.float32)
    x[1, 5] = np.nan  # a missing value: NaN packed, null in lists
    p = np.array([[0.25, 0.75], [0.5, 0.5], [0.875, 0.125], [0.0, 1.0]], dtype=np.float32)
    as_lists = columns(4, features=[[None if v != v else v for v in row] for row in x.tolist()],
                       prediction=[1, 0, 0, 1], probabilities=p.tolist())
    as_packed = {**as_lists, "features": packed(x), "probabilities": packed(p)}
    stored = parse_events(column_body(as_packed), catalog, 5.0).rows
    assert stored == parse_events(column_body(as_lists), catalog, 5.0).rows
    assert len(stored) == 4 and np.isnan(np.frombuffer(stored[1].features)[5])


def test_a_column_batch_stores_what_its_events_would(catalog: ModelCatalog) -> None:
    groups = [columns(2, request_ids=["a", "b"], first_row=[0, 7], rows=[1, 1],
                      timestamp=[1.0, 2.0], latency_s=[0.01, 0.02],
                      features=[[0.5] * 20, [None] * 19 + [1.5]]),
              columns(3, mode="batch", request_ids=["job"], first_row=[4000])]
    from modelloop.schemas import ColumnBatch

    events = [e.model_dump() for g in ColumnBatch.model_validate({"columns": groups}).columns
              for e in g.events()]
    assert [e["request_id"] for e in events] == ["a-0", "b-7", "job-4000", "job-4001", "job-4002"]
    assert parse_events(column_body(*groups), catalog, 5.0).rows == parse_events(body(*events), catalog, 5.0).rows


def test_column_groups_say_what_they_stand_for_and_shadow_groups_do_not(catalog: ModelCatalog) -> None:
    parsed = parse_events(column_body(
        # no seen: every row of its two requests was sent
        columns(2, request_ids=["a", "b"], first_row=[0, 0], rows=[1, 1], timestamp=[1.0, 1.0],
                latency_s=[0.01, 0.01]),
        # a sixteenth sent: these 3 rows stand for 40 predictions
        columns(request_ids=["c"], seen=40, share=0.0625),
        # the challenger's answers to c: no prediction made
        columns(mode="shadow", request_ids=["c"], seen=40, share=0.0625)), catalog, 5.0)
    assert len(parsed.rows) == 8
    assert parsed.sampled == [Sampled("churn", 2, 1.0), Sampled("churn", 40, 0.0625)]
    assert parse_events(body(event()), catalog, 5.0).sampled == []  # the events form says nothing


@pytest.mark.parametrize(
    ("payload", "reason", "error"),
    [
        # a request list of the wrong length
        (column_body(columns(timestamp=[1.0, 2.0])), "invalid_event",
         "columns[0]: Value error, timestamp has 2 values for 1 requests"),
        # more rows of features than the requests hold
        (column_body(columns(rows=[2])), "invalid_event",
         "columns[0]: Value error, features has 3 rows; the requests hold 2"),
        # a feature row one short
        (column_body(columns(features=[[0.5] * 20, [0.5] * 19, [0.5] * 20])), "wrong_shape",
         "columns[0].features[1]: expected 20 values for churn v1, got 19"),
        # an infinite feature
        (column_body(columns()).replace(b"0.5,", b"1e999,", 1), "wrong_shape",
         "columns[0].features[0]: values must be numbers within float32 range (|x| <= 3.4e38) "
         "or null"),
        # a class index the model does not have, in the third row
        (column_body(columns(prediction=[1, 0, 2])), "wrong_shape",
         "columns[0].prediction[2]: expected a class index 0..1 for churn v1, got 2"),
        # probabilities of three classes
        (column_body(columns(probabilities=[[0.3, 0.7], [0.3, 0.7], [0.2, 0.3, 0.5]])),
         "wrong_shape", "columns[0].probabilities[2]: expected 2 values for churn v1, got 3"),
        # a version the registry does not have (the second group)
        (column_body(columns(), columns(version=9, request_ids=["other"])), "unknown_model",
         "columns[1].model: model 'churn' has no version 9"),
        # a latency of more than a day
        (column_body(columns(latency_s=[1e300])), "invalid_event",
         "columns[0]: Value error, latency_s[0]: must be between 0 and 86400 s, got 1e+300"),
        # a negative latency, of the third of three one-row requests
        (column_body(columns(request_ids=["a", "b", "c"], first_row=[0, 0, 0], rows=[1, 1, 1],
                             timestamp=[1.0] * 3, latency_s=[0.1, 0.2, -0.5])), "invalid_event",
         "columns[0]: Value error, latency_s[2]: must be between 0 and 86400 s, got -0.5"),
        # a request id of 191 characters, and an empty one
        (column_body(columns(request_ids=["r" * 191])), "invalid_event",
         "columns[0]: Value error, request_ids must be 1 to 190 characters each"),
        (column_body(columns(request_ids=[""])), "invalid_event",
         "columns[0]: Value error, request_ids must be 1 to 190 characters each"),
        # a prediction that is not the most probable class, in the second row
        (column_body(columns(prediction=[1, 0, 1])), "wrong_shape",
         "columns[0].prediction[1]: class 0 is not the most probable class of the event's "
         "probabilities (class 1: 0.7; class 0: 0.3)"),
        # packed features of the wrong width
        (column_body(columns(features=packed(np.zeros((3, 19))))), "wrong_shape",
         "columns[0].features.shape: expected 20 values per row for churn v1, got 19"),
        # packed bytes that do not fill the shape
        (column_body(columns(features={**packed(np.zeros((3, 20))), "shape": [4, 20]})), "invalid_event",
         "columns[0].features: Value error, data holds 240 bytes; shape [4, 20] of float32 needs 320"),
        # packed bytes with a character base64 does not have
        (column_body(columns(features={**packed(np.zeros((3, 20))), "data": "AAA!" * 80})), "invalid_event",
         "columns[0].features: Value error, data: not base64: Only base64 data is allowed"),
        # an infinite packed feature in the second row
        (column_body(columns(features=packed(np.where(np.arange(60).reshape(3, 20) == 25, np.inf, 0.0)))),
         "wrong_shape", "columns[0].features[1]: values must be numbers within float32 range "
                        "(|x| <= 3.4e38) or null"),
        # packed probabilities of three classes
        (column_body(columns(probabilities=packed(np.full((3, 3), 1 / 3)))), "wrong_shape",
         "columns[0].probabilities.shape: expected 2 values per row for churn v1, got 3"),
    ],
)
def test_bad_column_batches_are_rejected_whole(catalog: ModelCatalog, payload: bytes, reason: str,
                                               error: str) -> None:
    with pytest.raises(InputError) as err:
        parse_events(payload, catalog, 0.0)
    assert (err.value.status, err.value.reason, str(err.value)) == (422, reason, error)
    assert err.value.rejected >= 3  # every row of the batch is counted as rejected


@pytest.mark.parametrize(("payload", "error"), [
    # an infinite latency and an infinite timestamp (JSON's 1e999, which Python's parser reads)
    (column_body(columns()).replace(b'"latency_s": [0.01]', b'"latency_s": [1e999]'),
     "columns[0]: Value error, latency_s[0]: must be between 0 and 86400 s, got inf"),
    (column_body(columns()).replace(b'"timestamp": [1.0]', b'"timestamp": [-1e999]'),
     "columns[0]: Value error, timestamp must be finite numbers"),
    # a request of no rows
    (column_body(columns(n=0, rows=[0], features=[], prediction=[], probabilities=[])),
     "columns[0]: Value error, rows must be >= 1 and first_row >= 0 for every request"),
])
def test_column_values_out_of_their_range_are_named(catalog: ModelCatalog, payload: bytes, error: str) -> None:
    with pytest.raises(InputError) as err:
        parse_events(payload, catalog, 0.0)
    assert (err.value.status, err.value.reason, str(err.value)) == (422, "invalid_event", error)


def test_a_repeated_request_id_is_left_to_the_store(catalog: ModelCatalog) -> None:
    """A request id twice in one batch (a client sent serving the same X-Request-ID twice)
    does not refuse the batch: every event of it is passed on, and the store decides."""
    rows = parse_events(body(event(), event(request_id="r2"), event(timestamp=2.0)), catalog, 5.0).rows
    assert [(r.request_id, r.ts) for r in rows] == [("r1", 1.0), ("r2", 1.0), ("r1", 2.0)]
    rows = parse_events(column_body(columns(), columns(request_ids=["req"], rows=[1], features=[
        [0.25] * 20], prediction=[1], probabilities=[[0.3, 0.7]])), catalog, 5.0).rows
    assert [r.request_id for r in rows] == ["req-0", "req-1", "req-2", "req-0"]


def test_unwatched_models_are_rejected(registered: TrainedModel, home: Path) -> None:
    catalog = ModelCatalog(Registry(home / "registry"), ["other"])
    with pytest.raises(InputError, match=r"events\[0\].model: model 'churn' is not watched by "
                                         r"this sidecar \(watching: other\)"):
        parse_events(body(event()), catalog, 0.0)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        # not JSON
        (b"[", "body: invalid JSON (unexpected end of data: line 1 column 2 (char 1))"),
        # the single form without a label
        (b'{"request_id": "a"}', "label: Field required"),
        # a list entry without a request id
        (b'{"feedback": [{"request_id": "a", "label": 1}, {"label": 0}]}',
         "feedback[1].request_id: Field required"),
        # an empty list
        (b'{"feedback": []}', "feedback: must be a non-empty list"),
    ],
)
def test_bad_feedback_bodies(payload: bytes, error: str) -> None:
    with pytest.raises(InputError) as err:
        parse_feedback(payload)
    assert str(err.value) == error


def test_feedback_single_and_list_forms() -> None:
    items, single = parse_feedback(b'{"request_id": "a", "label": "yes", "timestamp": 3}')
    assert single and items[0].label == "yes" and items[0].timestamp == 3
    items, single = parse_feedback(b'{"feedback": [{"request_id": "a", "label": 1}]}')
    assert not single and items[0].label == 1


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("yes", 1.0),                 # a class label
        ("no", 0.0),
        (1, 1.0),                     # a class index
        ("0", 0.0),                   # a class index written as text (CSV)
        (1.0, 1.0),                   # an integral float
        ("maybe", "'maybe' is not a class of churn v1 (classes: no, yes)"),
        (2, "class index 2 is out of range for churn v1 (0..1)"),
        (-1, "class index -1 is out of range for churn v1 (0..1)"),
        # text that is not exactly a class or an ASCII index: no coercion guesses
        ("-1", "'-1' is not a class of churn v1 (classes: no, yes)"),
        (" 1 ", "' 1 ' is not a class of churn v1 (classes: no, yes)"),
        ("-0", "'-0' is not a class of churn v1 (classes: no, yes)"),
        ("\u0661", "'\u0661' is not a class of churn v1 (classes: no, yes)"),  # Arabic-Indic one
        ("Yes", "'Yes' is not a class of churn v1 (classes: no, yes)"),
        (1e300, "class index 1e+300 is out of range for churn v1 (0..1)"),
        (0.5, "0.5 is not a class index of churn v1"),
    ],
)
def test_labels_resolve_to_class_indexes(registered: TrainedModel, home: Path, label: Any,
                                         expected: Any) -> None:
    meta = Registry(home / "registry").get("churn").metadata
    assert resolve_label(label, meta) == expected


def test_group_commit_merges_concurrent_batches_and_flushes_on_close(
        tmp_path: Path, catalog: ModelCatalog) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'e.db'}")
    writer = GroupCommitWriter(store, lambda b: parse_events(b, catalog, 0.0))
    futures = []
    lock = threading.Lock()

    def send(k: int) -> None:
        fut = writer.submit(body(*[event(request_id=f"{k}-{i}") for i in range(50)]))
        with lock:
            futures.append(fut)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bad = writer.submit(body(event(request_id="x", version=0)))
    writer.close()  # the shutdown flush: every queued batch is committed before it returns
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [(50, Stored({"churn": 50}))] * 8
    with pytest.raises(InputError, match="version"):  # a bad batch fails alone
        bad.result()
    assert store.count_events() == 400
    late = writer.submit(body(event(request_id="late")))
    with pytest.raises(RuntimeError, match="shutting down"):
        late.result()
    store.close()


def test_the_writer_tells_on_stored_of_each_committed_batch_only(tmp_path: Path, catalog: ModelCatalog) -> None:
    """``on_stored`` follows the commit: not for a refused batch, once per batch of a group
    commit (a copy of a batch in the same commit comes to nothing new), and a failing hook
    neither loses the batch nor its acknowledgement."""
    store = open_store(f"sqlite:///{tmp_path / 'e.db'}")
    gate, told = threading.Event(), []
    first = column_body(columns(2, request_ids=["gate"], seen=5, share=0.5))
    copied = column_body(columns(3, request_ids=["copied"], seen=12, share=0.25))

    def parse(b: bytes) -> ParsedEvents:
        if b == first:
            gate.wait(10)  # holds the writer, so the next bodies queue up into one group commit
        return parse_events(b, catalog, 0.0)

    def on_stored(parsed: ParsedEvents, stored: Stored) -> None:
        told.append((parsed.sampled, stored.new))
        if len(told) == 1:
            raise RuntimeError("a failing hook")

    writer = GroupCommitWriter(store, parse, on_stored=on_stored)
    held = writer.submit(first)
    queued = [writer.submit(copied), writer.submit(copied), writer.submit(column_body(columns(2, version=0)))]
    gate.set()
    writer.close()
    assert held.result() == (2, Stored({"churn": 2}))  # acknowledged though its hook failed
    assert [f.result() for f in queued[:2]] == [(3, Stored({"churn": 3})), (3, Stored({"churn": 0}))]
    with pytest.raises(InputError):
        queued[2].result()
    assert told == [([Sampled("churn", 5, 0.5)], {"churn": 2}),
                    ([Sampled("churn", 12, 0.25)], {"churn": 3}),
                    ([Sampled("churn", 12, 0.25)], {"churn": 0})]  # the refused batch: not told
    assert store.count_events() == 5
    store.close()
