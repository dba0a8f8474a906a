"""The shortcuts of array bodies (the numbers-only check, the simdjson reader): each must accept
exactly what the full per-value check accepts and give the same matrix, and every value they
let through must still get its 422 when wrong."""

from __future__ import annotations

import json
import pickle
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelloop.http import ApiError
from serving.validation import (
    RequestError,
    numeric_rows,
    only_numbers,
    parse_instances,
    parse_json,
    parse_predict_body,
    preview,
    rows_to_array,
)
from tests.serving.onnx_models import metadata_for, random_mlp

NAMES = ["a", "b", "c"]


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"instances": [[1.5, -2e3, null]]}', True),
    (b'{ "instances" : [[1, 2, NaN]] }', True),       # NaN: read by the fallback parser, judged later
    (b'{"instances": [[1.5, "2", 3]]}', False),       # a string value
    (b'{"instances": [[1.5, true, 3]]}', False),      # a boolean
    (b'{"instances": [[false, 1, 2]]}', False),
    (b'{"instances": [[Infinity, 1, 2]]}', False),
    (b'{"instances": [[1, 2, 3]], "x": 1}', False),   # another key
    (b'{"inst\\"ances": [[1, 2, 3]]}', False),        # an escaped quote in the key
    (b'{"instances": [[{}, 1, 2]]}', True),           # no string: np.array fails on it below
    (b'[[1.5]]', False),                              # no key at all
])
def test_only_numbers_reads_the_bytes(body: bytes, expected: bool) -> None:
    assert only_numbers(body) is expected


def convert(body: bytes, nan_policy: str = "allow") -> np.ndarray:
    rows = parse_json(body)["instances"]
    return rows_to_array(rows, NAMES, nan_policy, records=False, numbers_only=only_numbers(body))


def test_numbers_only_gives_the_same_matrix() -> None:
    body = b'{"instances": [[1, 2.5, null], [-1e3, 0, 3]]}'
    x = convert(body)
    slow = rows_to_array(parse_json(body)["instances"], NAMES, "allow", records=False)
    assert x.dtype == np.float32 and x.shape == (2, 3)
    np.testing.assert_array_equal(x, slow)


@pytest.mark.parametrize(("instances", "nan_policy", "code", "field"), [
    ([[1, [2], 3]], "allow", "wrong_type", "instances[0][1]"),
    ([[[1], [2], [3]]], "allow", "wrong_type", "instances[0][0]"),   # numpy would make it 3-D
    ([[[], [], []]], "allow", "wrong_type", "instances[0][0]"),
    ([[{}, 1, 2]], "allow", "wrong_type", "instances[0][0]"),
    ([[1, None, 3]], "reject", "missing_value", "instances[0][1]"),
    ([[1, 2, 1e39]], "allow", "not_finite", "instances[0][2]"),
    ([[1, 2, 10**400]], "allow", "not_finite", "instances[0][2]"),   # beyond float64: no 500
])
def test_numbers_only_still_names_the_bad_value(instances: list[Any], nan_policy: str, code: str,
                                                field: str) -> None:
    body = json.dumps({"instances": instances}).encode()
    assert only_numbers(body)
    with pytest.raises(RequestError) as err:
        convert(body, nan_policy)
    assert (err.value.status, err.value.code, err.value.field) == (422, code, field)


def general(body: bytes, nan_policy: str = "allow", max_rows: int = 100) -> np.ndarray:
    """The general path: orjson (or the NaN-reading fallback), then the per-row checks."""
    meta = metadata_for("m", random_mlp(3, (4,), 2), NAMES, ["no", "yes"])
    return parse_instances(parse_json(body), meta, nan_policy=nan_policy, max_rows=max_rows, body=body)


def test_simdjson_reader_gives_the_general_paths_matrix() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(scale=1e3, size=(257, 3))
    x[0] = [0.0, -0.0, 1e-45]
    x[1] = [3.4e38, -3.4e38, 1.17549435e-38]
    ints = [*rng.integers(-2 ** 62, 2 ** 62, size=(5, 3)).tolist(), [2 ** 64 - 1, -2 ** 63, 0]]
    bodies = [
        json.dumps({"instances": x.tolist()}).encode(),
        json.dumps({"instances": x.astype(np.float32).tolist()}, indent=2).encode(),  # whitespace
        json.dumps({"instances": ints}).encode(),                                     # 64-bit integers
        b'{"instances":[[1E2,-2.5e-3,7],[0.1,1e+1,-0]]}',
    ]
    for body in bodies:
        fast = numeric_rows(body, 3, 1000)
        assert fast is not None, body[:60]
        slow = general(body, max_rows=1000)
        assert fast.dtype == np.float32 and fast.shape == slow.shape
        np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize("body", [
    b'{"instances": [[1, 2, null]]}',                    # null: the NaN policy decides
    b'{"instances": [[1, 2, NaN]]}',                     # not JSON; the fallback parser reads it
    b'{"instances": [[1, 2, 1e999]]}',
    b'{"instances": [[1, 2, 1e39]]}',                    # beyond float32
    b'{"instances": [[1, 2, 123456789012345678901234567890]]}',
    b'{"instances": [[1, 2, 3], [4, 5]]}',               # ragged
    b'{"instances": [[1, 2, 3, 4], [5, 6]]}',            # ragged with the right total
    b'{"instances": [[[1], [2], [3]]]}',                 # nested: the flat copy would fit
    b'{"instances": [5, [[1, 2], [3, 4], 6]]}',
    b'{"instances": [1, 2, 3]}',                         # rows that are not arrays
    b'{"instances": []}',
    b'{"instances": [[1, 2, 3]], "extra": 1}',
    b'{"inputs": [[1, 2, 3]]}',
    b'{"instances": [[1, 2, 3]]',                        # broken JSON
    b'[[1, 2, 3]]',
    b'{"instances": [[1, 2, 3], [4, 5, 6], [7, 8, 9]]}',  # more rows than the limit (2)
])
def test_simdjson_reader_leaves_the_rest_to_the_general_path(body: bytes) -> None:
    assert numeric_rows(body, 3, 2) is None
    meta = metadata_for("m", random_mlp(3, (4,), 2), NAMES, ["no", "yes"])
    try:
        expected: Any = general(body, max_rows=2)
    except RequestError as exc:
        expected = exc
    try:
        got: Any = parse_predict_body(body, meta, nan_policy="allow", max_rows=2)
    except RequestError as exc:
        got = exc
    if isinstance(expected, RequestError):
        assert isinstance(got, RequestError) and repr(got) == repr(expected)
    else:
        np.testing.assert_array_equal(got, expected)


def reference(body: bytes, nan_policy: str, max_rows: int) -> Any:
    """The general path with no shortcut (every value's type checked): its matrix or its error."""
    meta = metadata_for("m", random_mlp(3, (4,), 2), NAMES, ["no", "yes"])
    try:
        return parse_instances(parse_json(body), meta, nan_policy=nan_policy, max_rows=max_rows)  # type: ignore[arg-type]
    except RequestError as exc:
        return exc


# A value as JSON text: numbers in the forms clients write, and what the shortcuts must leave
# to the general path (null, NaN, Infinity, 1e999, integers beyond 64 bits, strings, booleans,
# nested arrays and objects)
NUMBERS = st.floats(allow_nan=False, allow_infinity=False) | st.floats(width=32, allow_nan=False,
                                                                       allow_infinity=False)
NUMBER_TEXT = st.one_of(
    NUMBERS.map(repr), NUMBERS.map(lambda v: f"{v:e}"), NUMBERS.map(lambda v: f"{v:.3E}"),
    st.integers(-2 ** 70, 2 ** 70).map(str), st.sampled_from(["0", "-0", "1e2", "-2.5e-3", "1E+1", "3.4e38"]))
ODD_TEXT = st.sampled_from(["null", "NaN", "Infinity", "-Infinity", "1e999", "3.5e38", '"1"', "true",
                            "false", "[1]", "[]", "{}", "123456789012345678901234567890"])
SPACE = st.sampled_from(["", " ", "\n  "])


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Half of them arrays of 3 numbers (the model's width) under "instances", the others with
    odd values, other widths, another key or one more."""
    clean = draw(st.booleans())
    value = NUMBER_TEXT if clean else st.one_of(NUMBER_TEXT, ODD_TEXT)
    width = st.just(3) if clean or draw(st.booleans()) else st.integers(1, 4)
    rows = draw(st.lists(width.flatmap(lambda w: st.lists(value, min_size=w, max_size=w)),
                         min_size=0 if not clean else 1, max_size=6))
    sp = draw(SPACE)
    text = "[" + f",{sp}".join("[" + f",{sp}".join(row) + "]" for row in rows) + "]"
    key, extra = ('"instances"', "") if clean else draw(st.sampled_from(
        [('"instances"', ""), ('"instances"', ""), ('"inputs"', ""), ('"instances"', ', "x": 1')]))
    return f"{{{sp}{key}{sp}:{sp}{text}{extra}{sp}}}".encode()


@given(bodies(), st.sampled_from(["allow", "reject"]), st.sampled_from([4, 1000]))
@settings(max_examples=600, deadline=None, database=None, derandomize=True)
def test_the_shortcuts_give_the_general_paths_answer_for_generated_bodies(body: bytes, nan_policy: str,
                                                                          max_rows: int) -> None:
    """parse_predict_body (simdjson for arrays of numbers, the numbers-only check) against the
    general path without either: the same matrix, or the same error."""
    meta = metadata_for("m", random_mlp(3, (4,), 2), NAMES, ["no", "yes"])
    expected = reference(body, nan_policy, max_rows)
    try:
        got: Any = parse_predict_body(body, meta, nan_policy=nan_policy, max_rows=max_rows)  # type: ignore[arg-type]
    except RequestError as exc:
        got = exc
    if isinstance(expected, RequestError):
        assert isinstance(got, RequestError) and repr(got) == repr(expected)
    else:
        assert not isinstance(got, RequestError), got
        assert got.dtype == expected.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20)


def as_orjson_reads(value: Any) -> Any:
    """``value`` with each integer beyond 64 bits as the float orjson reads it as."""
    if isinstance(value, list):
        return [as_orjson_reads(v) for v in value]
    if isinstance(value, dict):
        return {k: as_orjson_reads(v) for k, v in value.items()}
    if type(value) is int and not -2 ** 63 <= value < 2 ** 64:
        return float(value)
    return value


@given(JSON_VALUES, st.booleans())
@settings(max_examples=400, deadline=None, database=None, derandomize=True)
def test_the_json_reader_reads_what_orjson_reads_as_pythons_parser_does(value: Any, indent: bool) -> None:
    """parse_json's two steps agree: a document orjson reads gives the values Python's parser
    gives (but an integer beyond 64 bits, which orjson reads as a float); the rest (NaN,
    Infinity, numbers beyond float64, lone surrogates) only Python's parser reads."""
    text = json.dumps(value, indent=2 if indent else None).encode("utf-8", "surrogatepass")
    slow = json.loads(text)
    try:
        fast = orjson.loads(text)
    except orjson.JSONDecodeError:
        assert repr(parse_json(text)) == repr(slow)
    else:
        assert repr(parse_json(text)) == repr(fast) == repr(as_orjson_reads(slow))


def test_simdjson_reader_finds_nested_rows_in_a_large_body() -> None:
    nested = json.dumps({"instances": [[[1], [2], [3]]] * 600}).encode()  # counted by numpy
    flat = json.dumps({"instances": [[1, 2, 3]] * 600}).encode()
    assert len(nested) > 8192 and numeric_rows(nested, 3, 1000) is None
    assert numeric_rows(flat, 3, 1000) is not None


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(("value", "shown"), [
    ([1, "a", None, True, 1.5], '[1, "a", null, true, 1.5]'),         # as json.dumps writes it
    ({"a": [1, {"b": None}]}, '{"a": [1, {"b": null}]}'),
    ("x" * 100, '"' + "x" * 39 + "..."),                               # cut after 40 characters
    (list(range(100)), "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1..."),
    (_nested(100_000), "[" * 40 + "..."),                              # json.dumps and repr recurse
    (10 ** 5000, "int"),                                               # beyond int-to-text's 4300 digits
    (float("nan"), "NaN"),
], ids=["scalars", "nested object", "long string", "long array", "100,000 deep", "huge integer", "NaN"])
def test_preview_shows_a_bounded_prefix_of_any_value(value: Any, shown: str) -> None:
    assert preview(value) == shown


@pytest.mark.parametrize("body", [
    b'{"instances": [[' + b"[" * 1000 + b"1" + b"]" * 1000 + b', 2, 3]]}',                # an array row
    b'{"instances": [{"a": ' + b"[" * 1000 + b"1" + b"]" * 1000 + b', "b": 2, "c": 3}]}',  # a record
], ids=["array row", "record"])
def test_a_value_nested_1000_deep_is_named_not_a_recursion_error(body: bytes) -> None:
    meta = metadata_for("m", random_mlp(3, (4,), 2), NAMES, ["no", "yes"])
    with pytest.raises(RequestError) as err:
        parse_predict_body(body, meta, nan_policy="allow", max_rows=10)
    assert (err.value.status, err.value.code) == (422, "wrong_type")
    assert err.value.field in ("instances[0][0]", "instances[0].a")
    assert "expected a number, got array [[[[" in err.value.message


def test_a_request_error_is_the_cores_error_in_its_shape() -> None:
    err = RequestError(503, "overloaded", "body", "body: \ud800 busy", {"Retry-After": "2"})
    assert isinstance(err, ApiError) and str(err) == err.message == "body: \ud800 busy"
    assert err.body() == {"error": "body: \\ud800 busy", "code": "overloaded", "field": "body",
                          "errors": ["body: \\ud800 busy"]}  # a lone surrogate as its escape
    back = pickle.loads(pickle.dumps(err))  # (an explanation's error crosses processes)
    assert repr(back) == repr(err) and back.headers == {"Retry-After": "2"}
