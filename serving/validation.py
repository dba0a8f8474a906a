"""Check request data against the model's schema at the boundary, and say exactly what is wrong.

Every problem becomes a :class:`RequestError`: an HTTP status, a short ``code``, the ``field`` it
concerns (``instances[2].f03``, ``inputs[0].shape``, ``body``) and a sentence naming the problem.
The routes turn it into a 4xx JSON body; nothing a client sends can cause a 500.

The common case is kept cheap: one pass over the values' Python types (C speed), or for array
rows a few scans of the raw bytes that rule out strings and booleans (:func:`only_numbers`), and
one numpy conversion; the slow, precise search for the offending value runs only when something
is wrong.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson
import simdjson

from modelloop.categorical import MISSING, columns
from modelloop.http import ApiError
from modelloop.schemas import MAX_CATEGORY_CHARS, ModelMetadata
from serving.settings import NanPolicy

F32_MAX = float(np.finfo(np.float32).max)
_NUMBER_TYPES = {float, int}


class RequestError(ApiError):
    """A client error: status, code, the field concerned and a message naming the problem, and
    extra response headers (``Retry-After`` on a refusal that a later try may pass). The core's
    :class:`~modelloop.http.ApiError`, so serving answers it in the body both apps share
    (``body()``); serving's errors have one message each and always name a field."""

    field: str

    def __init__(self, status: int, code: str, field: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status, code, field, message, headers)

    def __repr__(self) -> str:
        return f"RequestError({self.status}, {self.code!r}, {self.field!r}, {self.message!r})"


def _key_text(key: str) -> str:
    """A key the client sent, as an error's field names it: not a megabyte of it."""
    return key if len(key) <= 100 else key[:100] + "..."


def parse_json(body: bytes) -> Any:
    """Parse a JSON body (every JSON body form: ``/predict``, OIP); NaN/Infinity literals are
    read (and judged later), anything else 400. One reader in two steps: orjson, and only for
    what it refuses Python's parser, which gives the same values for what orjson reads, but
    for an integer beyond 64 bits, which orjson reads as the nearest float (a test compares
    them over generated documents)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson is strict; Python's parser also reads NaN, Infinity, numbers beyond float64
        # (1e999, an integer of 400 digits) and lone surrogates, which are then reported as a
        # value problem naming the field rather than as broken JSON.
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise RequestError(400, "malformed_json", "body", f"body is not valid JSON: {exc}") from None


def type_name(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class _Text(str):
    """Text of :func:`preview` itself (brackets, commas), as opposed to a value to render."""


def preview(value: Any, limit: int = 40) -> str:
    """``value`` as JSON text, cut after ``limit`` characters: what an error message shows of
    a client's value. Built with a stack rather than ``json.dumps`` or ``repr``, which recurse
    (a value a thousand arrays deep raised RecursionError, a 500, while its error was written),
    and without rendering more of a large value than is shown."""
    out: list[str] = []
    size = 0
    stack: list[Any] = [value]
    while stack and size <= limit:
        item = stack.pop()
        if isinstance(item, _Text):
            text = str(item)
        elif isinstance(item, (list, dict)):
            is_list = isinstance(item, list)
            head = list(itertools.islice(item if isinstance(item, list) else item.items(), limit))
            more = ", ..." if len(item) > limit else ""
            stack.append(_Text(more + ("]" if is_list else "}")))
            for k in range(len(head) - 1, -1, -1):  # pushed last first
                stack.extend([head[k]] if is_list else [head[k][1], _Text(": "), head[k][0]])
                if k:
                    stack.append(_Text(", "))
            text = "[" if is_list else "{"
        elif isinstance(item, str):
            text = json.dumps(item[:limit])
        else:
            try:
                text = json.dumps(item)
            except (TypeError, ValueError):  # an integer of thousands of digits
                text = type(item).__name__
        out.append(text)
        size += len(text)
    shown = "".join(out)
    return shown if len(shown) <= limit and not stack else shown[:limit] + "..."


def _value_problem(value: Any, nan_policy: NanPolicy) -> tuple[str, str] | None:
    """(code, message) when a single feature value is not acceptable."""
    if value is None or (type(value) is float and math.isnan(value)):
        if nan_policy == "reject":
            return "missing_value", "missing value (null/NaN) is not allowed (nan_policy=reject)"
        return None
    if type(value) not in _NUMBER_TYPES:
        return "wrong_type", f"expected a number, got {type_name(value)} {preview(value)}"
    if abs(value) > F32_MAX or not math.isfinite(value):  # (an int beyond float64 fails isfinite)
        return "not_finite", f"value {value!r:.40} is not a finite float32 number"
    return None


FieldOf = Callable[[int, int], str]
"""``(row, column) -> field name`` of a value, for the error that names it."""


def _locate(rows: Sequence[Sequence[Any]], nan_policy: NanPolicy, field_of: FieldOf) -> RequestError:
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            problem = _value_problem(value, nan_policy)
            if problem:
                field = field_of(i, j)
                return RequestError(422, problem[0], field, f"{field}: {problem[1]}")
    raise AssertionError("no offending value found")  # pragma: no cover - callers checked


def _record_error(i: int, rec: Any, names: Sequence[str], name_set: set[str]) -> RequestError:
    if not isinstance(rec, dict):
        return RequestError(422, "wrong_type", f"instances[{i}]",
                            f"instances[{i}]: expected an object of features, got {type_name(rec)}")
    unknown = sorted(set(rec) - name_set)
    missing = [n for n in names if n not in rec]
    if unknown:
        key = _key_text(unknown[0])
        near = difflib.get_close_matches(key, missing or names, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return RequestError(422, "unknown_feature", f"instances[{i}].{key}",
                            f"instances[{i}].{key}: unknown feature{hint}; the model takes {len(names)} "
                            f"features: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}")
    key = missing[0]
    return RequestError(422, "missing_feature", f"instances[{i}].{key}",
                        f"instances[{i}].{key}: missing feature ({len(missing)} missing)")


def _array_row_error(i: int, row: Any, n: int) -> RequestError:
    if not isinstance(row, list):
        return RequestError(422, "wrong_type", f"instances[{i}]",
                            f"instances[{i}]: expected an array of {n} numbers, got {type_name(row)}")
    return RequestError(422, "wrong_shape", f"instances[{i}]",
                        f"instances[{i}]: expected {n} values, got {len(row)}")


def only_numbers(body: bytes | None) -> bool:
    """Whether the JSON body of ``{"instances": [[...], ...]}`` holds nothing but numbers, null
    and arrays after its one key: no string (``"``), no ``true`` or ``false`` (``t``, ``f``; JSON
    numbers and null have neither). Three memchr scans of the bytes: a twentieth of the cost of
    looking at the type of every parsed value, which was half the parse of a 1024-row request."""
    if body is None:
        return False
    key_end = body.find(b'"', body.find(b'"') + 1) + 1
    return key_end > 0 and all(body.find(c, key_end) == -1 for c in (b'"', b"t", b"f"))


_SIMDJSON_ERRORS = (ValueError, TypeError, RuntimeError, KeyError)


def _brackets(body: bytes) -> int:
    """Opening brackets in ``body``: ``bytes.count`` for a small body, numpy for a large one,
    where it is the faster (docs/serving.md)."""
    if len(body) < 8192:
        return body.count(b"[")
    return int(np.count_nonzero(np.frombuffer(body, np.uint8) == ord("[")))


def numeric_rows(body: bytes, n_features: int, max_rows: int) -> np.ndarray | None:
    """The float32 ``[n, n_features]`` matrix of a body that is exactly ``{"instances": [[n_features
    numbers], ...]}`` with every value finite in float32, read straight into a buffer by
    simdjson (no Python object per value, unlike ``orjson.loads`` and a list-to-array
    conversion; docs/serving.md compares them); None for any other body, which then
    takes the general path (:func:`parse_instances`) and gets its precise error there.

    The shape is checked, not assumed: the body holds no strings or booleans
    (:func:`only_numbers`), its one key is ``instances``, each of its ``n`` rows is an array of
    ``n_features`` values, and the body has ``n + 1`` opening brackets, so no row nests another
    array (which the flattening copy would not notice)."""
    if not only_numbers(body):
        return None
    try:
        doc = simdjson.Parser().parse(body)
        if type(doc) is not simdjson.Object or len(doc) != 1 or "instances" not in doc:
            return None
        rows = doc["instances"]
        if not isinstance(rows, simdjson.Array):
            return None
        n = len(rows)
        if not 0 < n <= max_rows or _brackets(body) != n + 1:
            return None
        if any(type(row) is not simdjson.Array or len(row) != n_features for row in rows):
            return None
        flat = np.frombuffer(rows.as_buffer(of_type="d"), dtype=np.float64)  # null raises here
    except _SIMDJSON_ERRORS:  # broken JSON, null, 1e999, integers beyond 64 bits
        return None
    if flat.size != n * n_features or not flat.size or np.abs(flat).max() > F32_MAX:
        return None
    return flat.astype(np.float32).reshape(n, n_features)


def rows_to_array(rows: Sequence[Sequence[Any]], names: Sequence[str], nan_policy: NanPolicy,
                  records: bool, prefix: str = "instances",
                  field_of: FieldOf | None = None, numbers_only: bool = False) -> np.ndarray:
    """Rows of Python scalars to float32 ``[n, features]``, or the RequestError of the first bad
    value, named ``prefix[i].name`` (records), ``prefix[i][j]`` or by ``field_of(i, j)``.
    ``numbers_only``: the body was seen to hold no strings or booleans (:func:`only_numbers`),
    so the values need no type check of their own (nested values still fail below)."""
    if field_of is None:
        field_of = ((lambda i, j: f"{prefix}[{i}].{names[j]}") if records
                    else (lambda i, j: f"{prefix}[{i}][{j}]"))
    if not numbers_only:  # (a null under "reject" is found as NaN below)
        types = set(map(type, itertools.chain.from_iterable(rows)))
        allowed = _NUMBER_TYPES | {type(None)} if nan_policy == "allow" else _NUMBER_TYPES
        if not types <= allowed:  # null under "reject", strings, booleans, nested values
            raise _locate(rows, nan_policy, field_of)
    try:
        wide = np.array(rows, dtype=np.float64)  # null -> NaN
    except (OverflowError, TypeError, ValueError):  # an integer beyond float64; a nested value
        raise _locate(rows, nan_policy, field_of) from None
    if wide.ndim != 2:  # every value nested alike ([[[1], [2], ...]]) makes no error above
        raise _locate(rows, nan_policy, field_of)
    # Infinity/1e999 and values beyond float32 (NaN compares False here) ...
    if (np.abs(wide) > F32_MAX).any():
        raise _locate(rows, nan_policy, field_of)
    # ... and NaN literals, which only the fallback parser produces
    if nan_policy == "reject" and np.isnan(wide).any():
        raise _locate(rows, nan_policy, field_of)
    return wide.astype(np.float32)


def parse_predict_body(body: bytes, meta: ModelMetadata, *, nan_policy: NanPolicy, max_rows: int) -> np.ndarray:
    """The ``/predict`` body as the model's float32 input: arrays of numbers the fast way
    (:func:`numeric_rows`), anything else (records, tensors, bad input) through
    :func:`parse_instances`; a model with categorical features takes the general path (its
    rows are object matrices, :func:`categorical_rows`)."""
    if len(meta.input_dims) == 1 and not meta.categories:
        x = numeric_rows(body, len(meta.feature_names), max_rows)
        if x is not None:
            return x
    return parse_instances(parse_json(body), meta, nan_policy=nan_policy, max_rows=max_rows, body=body)


def parse_instances(doc: Any, meta: ModelMetadata, *, nan_policy: NanPolicy, max_rows: int,
                    body: bytes | None = None) -> np.ndarray:
    """The ``/predict`` body ``{"instances": [...]}`` (records or arrays) as float32 rows;
    ``body``, the raw bytes of ``doc``, lets the value check run on the bytes."""
    if not isinstance(doc, dict):
        raise RequestError(422, "wrong_type", "body",
                           f'body: expected an object {{"instances": [...]}}, got {type_name(doc)}')
    if "instances" not in doc:
        raise RequestError(422, "missing_field", "instances",
                           'instances: missing; send {"instances": [{"feature": value, ...}, ...]}')
    extra = sorted(set(doc) - {"instances"})
    if extra:
        key = _key_text(extra[0])
        raise RequestError(422, "unknown_field", key, f"{key}: unknown field; only 'instances' is read")
    instances = doc["instances"]
    if not isinstance(instances, list):
        raise RequestError(422, "wrong_type", "instances",
                           f"instances: expected an array of rows, got {type_name(instances)}")
    if not instances:
        raise RequestError(422, "empty", "instances", "instances: at least one row is needed")
    if len(instances) > max_rows:
        raise RequestError(413, "too_many_rows", "instances",
                           f"instances: {len(instances)} rows is more than the limit of {max_rows} "
                           "(MODELLOOP_SERVING_MAX_ROWS_PER_REQUEST)")
    names = meta.feature_names
    dims = meta.input_dims
    if meta.categories:
        return _categorical_instances(instances, meta, nan_policy)
    if len(dims) == 1:
        return _rows_instances(instances, names, nan_policy, body)
    first = instances[0]
    if None not in dims and (type(first) is dict or (type(first) is list and first
                                                     and type(first[0]) is not list)):
        # an image model sent rows: records of its pixels, or flat arrays of them
        return _rows_instances(instances, names, nan_policy).reshape(-1, *dims)
    return _tensor_instances(instances, dims, names, nan_policy)


def _rows_instances(instances: list[Any], names: Sequence[str], nan_policy: NanPolicy,
                    body: bytes | None = None) -> np.ndarray:
    """Instances that are rows of features: records by name, or arrays in the feature order."""
    n = len(names)
    if isinstance(instances[0], dict):
        name_set = set(names)
        getter = operator.itemgetter(*names)
        rows: list[Any] = []
        for i, rec in enumerate(instances):
            if type(rec) is not dict or rec.keys() != name_set:
                raise _record_error(i, rec, names, name_set)
            rows.append(getter(rec))
        if n == 1:
            rows = [(r,) for r in rows]
        return rows_to_array(rows, names, nan_policy, records=True)
    for i, row in enumerate(instances):
        if type(row) is not list or len(row) != n:
            raise _array_row_error(i, row, n)
    return rows_to_array(instances, names, nan_policy, records=False, numbers_only=only_numbers(body))


def _categorical_instances(instances: list[Any], meta: ModelMetadata, nan_policy: NanPolicy) -> np.ndarray:
    """Rows of a model with categorical features (records by name, or arrays in the feature
    order) as the object matrix of :func:`categorical_rows`."""
    names = meta.feature_names
    n = len(names)
    rows: list[Any] = []
    if isinstance(instances[0], dict):
        name_set = set(names)
        getter = _picker(names)
        for i, rec in enumerate(instances):
            if type(rec) is not dict or rec.keys() != name_set:
                raise _record_error(i, rec, names, name_set)
            rows.append(getter(rec))
        return categorical_rows(rows, meta, nan_policy, lambda i, j: f"instances[{i}].{names[j]}")
    for i, row in enumerate(instances):
        if type(row) is not list or len(row) != n:
            raise _array_row_error(i, row, n)
    return categorical_rows(instances, meta, nan_policy, lambda i, j: f"instances[{i}][{j}]")


def categorical_rows(rows: Sequence[Sequence[Any]], meta: ModelMetadata, nan_policy: NanPolicy,
                     field_of: FieldOf) -> np.ndarray:
    """Rows of ``n_features`` Python values of a model with categorical features as an object
    matrix (modelloop/categorical.py): each numeric value checked and rounded as
    :func:`rows_to_array` does, each categorical value a string (null, missing, per
    ``nan_policy``); else the RequestError naming the first bad value by ``field_of(i, j)``."""
    numeric, cats = columns(meta)
    out = np.empty((len(rows), meta.n_features), dtype=object)
    if numeric:
        x = rows_to_array(list(map(_picker(numeric), rows)), meta.feature_names, nan_policy,
                          records=False, field_of=lambda i, k: field_of(i, numeric[k]))
        out[:, numeric] = x  # float32 values, as Python floats
    text = list(map(_picker(cats), rows))
    check_text(text, nan_policy, lambda i, k: field_of(i, cats[k]))
    out[:, cats] = text
    return out


def _picker(keys: Sequence[Any]) -> Callable[[Any], tuple[Any, ...]]:
    """``operator.itemgetter(*keys)``, a tuple also for one key."""
    if len(keys) == 1:
        key = keys[0]
        return lambda row: (row[key],)
    return operator.itemgetter(*keys)


def check_text(rows: Sequence[Sequence[Any]], nan_policy: NanPolicy, field_of: FieldOf) -> None:
    """Every value of ``rows`` is a string of at most ``MAX_CATEGORY_CHARS`` characters without
    NUL or lone surrogates (what an event may carry, modelloop.schemas, and ONNX Runtime can
    encode as UTF-8), or null (missing) where ``nan_policy`` allows; else the RequestError naming
    the first that is not, by ``field_of(i, k)``."""
    allowed = {str, type(None)} if nan_policy == "allow" else {str}
    values = list(itertools.chain.from_iterable(rows))
    types = set(map(type, values))
    if not types <= allowed:
        raise _locate_text(rows, nan_policy, field_of)
    text = [v for v in values if v is not None] if type(None) in types else values
    if not text:
        return
    joined = "".join(text)
    if max(map(len, text)) > MAX_CATEGORY_CHARS or "\x00" in joined or _lone_surrogate(joined) is not None:
        raise _locate_text(rows, nan_policy, field_of)


def category_problem(value: str) -> tuple[str, str] | None:
    """(code, message) when a categorical value is a string no event may carry."""
    if len(value) > MAX_CATEGORY_CHARS:
        return "too_long", f"a category of {len(value)} characters; at most {MAX_CATEGORY_CHARS} are accepted"
    if "\x00" in value:
        return "wrong_type", "a category must not contain NUL (\\u0000)"
    at = _lone_surrogate(value)
    if at is not None:
        return "wrong_type", f"a category must be UTF-8 text; a lone surrogate (\\u{ord(value[at]):04x}) is not"
    return None


def _lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in ``text`` (JSON's "\\ud800" decodes to one; no
    UTF-8 holds it, so ONNX Runtime and the event store cannot take it), else None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _locate_text(rows: Sequence[Sequence[Any]], nan_policy: NanPolicy, field_of: FieldOf) -> RequestError:
    for i, row in enumerate(rows):
        for k, value in enumerate(row):
            problem = category_problem(value) if type(value) is str else None
            if problem:
                return RequestError(422, problem[0], field_of(i, k), f"{field_of(i, k)}: {problem[1]}")
            if type(value) is str or (value is None and nan_policy == "allow"):
                continue
            field = field_of(i, k)
            if value is None:
                return RequestError(422, "missing_value", field, f"{field}: missing value (null) is not "
                                    "allowed (nan_policy=reject)")
            kind = "number" if type(value) in _NUMBER_TYPES else type_name(value)  # (JSON's name)
            return RequestError(422, "wrong_type", field, f"{field}: expected a string, got {kind} {preview(value)}")
    raise AssertionError("no offending value found")  # pragma: no cover - callers checked


def unknown_category_error(meta: ModelMetadata, rows: np.ndarray, prefix: str) -> RequestError:
    """The 422 naming the first value of ``rows`` (an object matrix) that the model's
    vocabulary of its feature does not hold, as ``prefix[row].feature``."""
    _, cats = columns(meta)
    for i, row in enumerate(rows):
        for j in cats:
            name, value = meta.feature_names[j], row[j]
            known = meta.categories[name]
            if value is not None and value != MISSING and value not in known:
                field = f"{prefix}[{i}].{name}"
                shown = ", ".join(json.dumps(v) for v in known[:5]) + (", ..." if len(known) > 5 else "")
                return RequestError(422, "unknown_category", field,
                                    f"{field}: unknown value {preview(value)}; the model knows {len(known)} "
                                    f"({shown}) (MODELLOOP_SERVING_UNKNOWN_CATEGORIES=reject)")
    raise AssertionError("no unknown value found")  # pragma: no cover - callers counted one


def _shape_text(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("any" if d is None else str(d) for d in dims) + "]"


def nested_rows(value: Any, dims: Sequence[int | None], field: str, status: int = 422) -> list[Any]:
    """A nested list of shape ``dims`` (None: any length >= 1) as rows of its last axis; a
    RequestError (``status``) naming the first sub-array of the wrong type or length."""
    want = dims[0]
    if type(value) is not list:
        return_type = "numbers" if len(dims) == 1 else "arrays"
        raise RequestError(status, "wrong_type", field,
                           f"{field}: expected an array of {return_type}, got {type_name(value)}")
    if (want is not None and len(value) != want) or not value:
        raise RequestError(status, "wrong_shape", field,
                           f"{field}: expected {want if want is not None else 'at least 1'} "
                           f"values, got {len(value)} (the model takes {_shape_text(dims)} here)")
    if len(dims) == 1:
        return [value]
    rows: list[Any] = []
    for k, child in enumerate(value):
        rows += nested_rows(child, dims[1:], f"{field}[{k}]", status)
    return rows


def _tensor_instances(instances: list[Any], dims: tuple[int | None, ...], names: Sequence[str],
                      nan_policy: NanPolicy) -> np.ndarray:
    """Instances of an image or sequence model, each a nested array of shape ``dims`` (a
    sequence's steps, ``dims[0]``, may be any number, the same in every instance of a request):
    checked and converted in one pass, an error naming the value's place in its instance."""
    rows: list[Any] = []
    shape: tuple[int, ...] | None = None
    for i, inst in enumerate(instances):
        field = f"instances[{i}]"
        rows += nested_rows(inst, dims, field)
        own = (len(inst), *dims[1:]) if dims[0] is None else dims
        if shape is None:
            shape = own  # type: ignore[assignment]
        elif own != shape:
            raise RequestError(422, "wrong_shape", field,
                               f"{field}: shape {list(own)} differs from instances[0]'s "
                               f"{list(shape)}; send instances of one length per request")
    assert shape is not None
    lead = shape[:-1]
    x = rows_to_array(rows, names, nan_policy, records=False,
                      field_of=lambda r, j: "instances" + index_text(r, (len(instances), *lead), j))
    return x.reshape(len(instances), *shape)


def index_text(row: int, lead: Sequence[int], column: int) -> str:
    """``[i][k]...[column]``: where row ``row`` of the rows of the last axis of a tensor whose
    leading axes are ``lead`` lies, and the value's column in it."""
    return "".join(f"[{int(v)}]" for v in np.unravel_index(row, tuple(lead))) + f"[{column}]"


def check_array(x: np.ndarray, field: str, *, nan_policy: NanPolicy) -> None:
    """Finite-value check of a decoded tensor (NaN per policy, infinity never)."""
    if np.isfinite(x).all():
        return
    inf = np.isinf(x)
    if inf.any():
        idx = tuple(int(i) for i in np.argwhere(inf)[0])
        raise RequestError(422, "not_finite", field, f"{field}: value at {list(idx)} is infinite")
    if nan_policy == "reject":
        idx = tuple(int(i) for i in np.argwhere(np.isnan(x))[0])
        raise RequestError(422, "missing_value", field,
                           f"{field}: missing value (NaN) at {list(idx)} is not allowed (nan_policy=reject)")
