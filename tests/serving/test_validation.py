"""The numbers-only shortcut of array bodies: it must accept exactly what the full per-value
check accepts, and every value it lets through must still get its 422 when wrong."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from serving.validation import RequestError, only_numbers, parse_json, rows_to_array

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
