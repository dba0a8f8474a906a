"""Open Inference Protocol v2 (KServe v2 / Triton HTTP): decode requests, encode responses.

JSON tensor data and the binary tensor data extension are both read and written: with the
``Inference-Header-Content-Length`` header the body is a JSON header followed by raw tensor bytes
(inputs with ``parameters.binary_data_size``); outputs come back binary when an output asks for
``binary_data`` or the request sets ``binary_data_output`` (what tritonclient does by default).
The routes live in ``serving/app.py``; this module is pure data handling.

The model's one input is ``input`` ``FP32 [-1, n_features]`` (an image model's ``[-1, 1, 8, 8]``,
which also takes ``[-1, 64]``; a sequence model's ``[-1, -1, n_features]``); a model with
categorical features takes two, ``input`` ``FP32 [-1, n_numeric]`` and ``categories`` ``BYTES
[-1, n_categorical]`` (their raw strings; modelloop/categorical.py); its outputs are the graph's
(``probabilities`` for a classifier). Per-row request ids are ``<id>-<row>`` where ``id`` is the
request's ``id`` (or a generated one, returned in the response).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from modelloop import __version__
from modelloop.categorical import columns
from modelloop.schemas import CATEGORIES_INPUT, INPUT_NAME, ModelMetadata
from serving.settings import NanPolicy
from serving.validation import (
    RequestError,
    check_array,
    check_text,
    index_text,
    nested_rows,
    parse_json,
    preview,
    rows_to_array,
    type_name,
)

HEADER_LENGTH = "inference-header-content-length"
DATATYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16}
NP_TO_OIP = {np.dtype(v).str: k for k, v in DATATYPES.items()}
PLATFORM = "onnxruntime_onnx"


def oip_datatype(dtype: str | np.dtype[Any]) -> str:
    """The OIP datatype name of a numpy dtype or a metadata dtype string (``"string"``, the
    categories input of a model with categorical features: BYTES)."""
    if isinstance(dtype, str) and dtype == "string":
        return "BYTES"
    return NP_TO_OIP.get(np.dtype(dtype).str, "BYTES")


def server_metadata() -> dict[str, Any]:
    """``GET /v2`` (and gRPC ``ServerMetadata``): the server's name, version and extensions."""
    return {"name": "modelloop", "version": __version__, "extensions": ["binary_tensor_data"]}


def model_metadata(meta: ModelMetadata) -> dict[str, Any]:
    """``GET /v2/models/{name}``: name, versions, platform, inputs and outputs with shapes."""

    def tensor(spec: Any) -> dict[str, Any]:
        shape = [-1 if d is None else d for d in spec.shape]
        return {"name": spec.name, "datatype": oip_datatype(spec.dtype), "shape": shape}

    inputs = [tensor(s) for s in meta.inputs] or [
        {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, meta.n_features]}
    ]
    return {"name": meta.name, "versions": [str(meta.version)], "platform": PLATFORM,
            "inputs": inputs, "outputs": [tensor(s) for s in meta.outputs]}


@dataclass
class InferRequest:
    x: np.ndarray
    id: str | None
    outputs: list[str]
    binary: dict[str, bool]


def _check_tensor_shape(shape: Any, dims: tuple[int | None, ...], n_features: int) -> list[int]:
    """``[rows, *dims]`` (any length >= 1 on a dynamic axis), or ``[rows, n_features]`` for an
    image model (rows of pixels)."""
    ok = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) and (
        (len(shape) == 1 + len(dims)
         and all(d >= 1 if m is None else d == m for d, m in zip(shape[1:], dims, strict=True)))
        or (None not in dims and shape[1:] == [n_features]))
    if not ok:
        axes = ", ".join("steps" if d is None else str(d) for d in dims)
        also = f" or [rows, {n_features}]" if None not in dims else ""
        raise RequestError(400, "wrong_shape", "inputs[0].shape",
                           f"inputs[0].shape: expected [rows, {axes}]{also}, got {preview(shape)}")
    return list(shape)


def _json_rows(data: Any, shape: list[int], meta: ModelMetadata, nan_policy: NanPolicy,
               field: str = "inputs[0].data") -> np.ndarray:
    if not isinstance(data, list):
        raise RequestError(400, "wrong_type", field, f"{field}: expected an array")
    if len(shape) > 2:  # an image or sequence tensor: nested to its shape, or flat row-major
        field = "inputs[0].data"
        width = shape[-1]
        nested = bool(data) and isinstance(data[0], list)

        def where(r: int, j: int) -> str:  # the value's place in the data as it was sent
            return field + (index_text(r, shape[:-1], j) if nested else f"[{r * width + j}]")

        if nested:
            rows = nested_rows(data, shape, field, status=400)
        elif len(data) != math.prod(shape):
            raise RequestError(400, "wrong_shape", field,
                               f"{field}: {len(data)} values do not fill shape {shape}")
        else:
            rows = [data[i:i + width] for i in range(0, len(data), width)]
        x = rows_to_array(rows, meta.feature_names, nan_policy, records=False, field_of=where)
        return x.reshape(shape)
    rows = _matrix_rows(data, shape, field)
    return rows_to_array(rows, meta.feature_names, nan_policy, records=False, prefix=field)


def _matrix_rows(data: list[Any], shape: list[int], field: str) -> list[Any]:
    """The rows of a ``[rows, columns]`` tensor's JSON data, sent nested or flat row-major."""
    if data and isinstance(data[0], list):  # row-major nested form
        if len(data) != shape[0] or any(type(r) is not list or len(r) != shape[1] for r in data):
            raise RequestError(400, "wrong_shape", field, f"{field}: nested data does not have shape {shape}")
        return data
    if len(data) != shape[0] * shape[1]:
        raise RequestError(400, "wrong_shape", field, f"{field}: {len(data)} values do not fill shape {shape}")
    n = shape[1]
    return [data[i:i + n] for i in range(0, len(data), n)] if n else [[] for _ in range(shape[0])]


def _parameters(value: Any, field: str) -> dict[str, Any]:
    """A ``parameters`` object (absent or null: none)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(400, "wrong_type", field,
                           f"{field}: expected an object of parameters, got {type_name(value)} {preview(value)}")
    return value


def _flag(params: dict[str, Any], name: str, field: str, default: bool) -> bool:
    """A boolean parameter such as ``binary_data`` (the protocol's type; Triton refuses others)."""
    value = params.get(name, default)
    if type(value) is not bool:
        raise RequestError(400, "wrong_type", f"{field}.{name}",
                           f"{field}.{name}: expected true or false, got {type_name(value)} {preview(value)}")
    return value


def decode_infer(body: bytes, header_length: str | None, meta: ModelMetadata, *,
                 nan_policy: NanPolicy, max_rows: int) -> InferRequest:
    """Parse an infer request (JSON or binary extension) into float32 rows for the model."""
    binary = b""
    if header_length is not None:
        # (isdigit alone passes "²", which int() refuses: a 500)
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise RequestError(400, "malformed_body", "Inference-Header-Content-Length",
                               f"Inference-Header-Content-Length: {header_length!r} does not fit a "
                               f"body of {len(body)} bytes")
        cut = int(header_length)
        body, binary = body[:cut], body[cut:]
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise RequestError(400, "wrong_type", "body", "body: expected an inference request object")
    return decode_request(doc, meta, nan_policy=nan_policy, max_rows=max_rows, binary=binary)


@dataclass
class TensorValues:
    """An input tensor's values sent outside the request's JSON-like fields (gRPC): the typed
    ``contents`` as an array, or ``raw_input_contents`` as bytes; ``field`` names where."""

    values: np.ndarray | bytes
    field: str


def decode_request(doc: dict[str, Any], meta: ModelMetadata, *, nan_policy: NanPolicy, max_rows: int,
                   binary: bytes = b"", values: Callable[[str, int], TensorValues] | None = None,
                   default_binary: bool = False) -> InferRequest:
    """An infer request's fields as parsed (REST's JSON, or gRPC's message as the same dict) into
    float32 rows for the model: ``binary`` holds the binary extension's bytes (REST); ``values``,
    called with the tensor's datatype and place in ``inputs`` once its name, datatype and shape
    are checked, gives its gRPC contents; ``default_binary`` is whether outputs are binary unless the request asks.
    A model with categorical features takes two tensors (:func:`_categorical_inputs`)."""
    if meta.categories:
        x = _categorical_inputs(doc, meta, nan_policy, max_rows, binary, values)
        outputs, binary_of = _requested_outputs(doc, meta, default_binary)
        return InferRequest(x, _request_id(doc), outputs, binary_of)
    tensor, datatype, shape = _input_head(doc, meta, max_rows)
    count = math.prod(shape)  # Python ints: a huge shape cannot wrap around
    dtype = np.dtype(DATATYPES[datatype])
    size = _parameters(tensor.get("parameters"), "inputs[0].parameters").get("binary_data_size")
    given = values(datatype, 0) if values is not None else None
    if size is not None and given is None:
        if type(size) is not int or size != count * dtype.itemsize or size > len(binary):
            raise RequestError(400, "wrong_shape", "inputs[0].parameters.binary_data_size",
                               f"inputs[0].parameters.binary_data_size: {preview(size)} bytes do not hold "
                               f"{datatype} {shape} ({len(binary)} binary bytes sent)")
        given = TensorValues(binary[:size], "inputs[0].data")
    if given is not None:
        x = _tensor_values(given, dtype, datatype, shape, count)
        check_array(x, "inputs[0].data", nan_policy=nan_policy)
    else:
        x = _json_rows(tensor.get("data"), shape, meta, nan_policy)
    dims = meta.input_dims
    if len(dims) > 1 and x.ndim == 2:  # an image model's rows of pixels: batched with images
        x = x.reshape(-1, *dims)
    outputs, binary_of = _requested_outputs(doc, meta, default_binary)
    return InferRequest(x, _request_id(doc), outputs, binary_of)


def _categorical_inputs(doc: dict[str, Any], meta: ModelMetadata, nan_policy: NanPolicy, max_rows: int,
                        binary: bytes, values: Callable[[str, int], TensorValues] | None) -> np.ndarray:
    """The two tensors of a model with categorical features, ``input`` (a numeric datatype,
    ``[rows, n_numeric]``) and ``categories`` (BYTES, ``[rows, n_categorical]``), in either
    order, as the object rows of modelloop/categorical.py. Binary data is read in the order of
    the inputs; ``values(datatype, k)`` gives the ``k``-th input's gRPC contents."""
    numeric, cats = columns(meta)
    widths = {INPUT_NAME: len(numeric), CATEGORIES_INPUT: len(cats)}
    inputs = doc.get("inputs")
    _check_names(inputs)
    if (not isinstance(inputs, list) or len(inputs) != 2 or not all(isinstance(t, dict) for t in inputs)
            or {t.get("name") for t in inputs} != set(widths)):
        raise RequestError(400, "wrong_shape", "inputs",
                           f"inputs: expected two tensors, {INPUT_NAME!r} FP32 [rows, {len(numeric)}] "
                           f"and {CATEGORIES_INPUT!r} BYTES [rows, {len(cats)}]")
    offset = 0
    rows: int | None = None
    out: np.ndarray | None = None
    for k, tensor in enumerate(inputs):
        name, field = tensor["name"], f"inputs[{k}]"
        datatype = tensor.get("datatype")
        if (name == INPUT_NAME and datatype not in DATATYPES) or (name == CATEGORIES_INPUT and datatype != "BYTES"):
            want = "a numeric datatype such as FP32" if name == INPUT_NAME else "BYTES"
            raise RequestError(400, "wrong_type", f"{field}.datatype",
                               f"{field}.datatype: {preview(datatype)} for {name!r}; send {want}")
        shape = tensor.get("shape")
        if (not isinstance(shape, list) or len(shape) != 2 or not all(type(d) is int and d >= 0 for d in shape)
                or shape[1] != widths[name]):
            raise RequestError(400, "wrong_shape", f"{field}.shape",
                               f"{field}.shape: expected [rows, {widths[name]}] for {name!r}, got {preview(shape)}")
        if not 1 <= shape[0] <= max_rows:
            status, code = (413, "too_many_rows") if shape[0] > max_rows else (400, "empty")
            raise RequestError(status, code, f"{field}.shape",
                               f"{field}.shape: {shape[0]} rows; between 1 and {max_rows} are accepted")
        if rows is not None and shape[0] != rows:
            raise RequestError(400, "wrong_shape", f"{field}.shape",
                               f"{field}.shape: {shape[0]} rows, and inputs[0] has {rows}")
        rows = shape[0]
        if out is None:
            out = np.empty((rows, meta.n_features), dtype=object)
        size = _parameters(tensor.get("parameters"), f"{field}.parameters").get("binary_data_size")
        given = values(datatype, k) if values is not None else None
        if size is not None and given is None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise RequestError(400, "wrong_shape", f"{field}.parameters.binary_data_size",
                                   f"{field}.parameters.binary_data_size: {preview(size)} bytes do not fit "
                                   f"the {len(binary) - offset} binary bytes left")
            given = TensorValues(binary[offset:offset + size], f"{field}.data")
            offset += size
        if name == INPUT_NAME:
            count = math.prod(shape)
            if given is not None:
                x = _tensor_values(given, np.dtype(DATATYPES[datatype]), datatype, shape, count)
                check_array(x, f"{field}.data", nan_policy=nan_policy)
            else:
                x = _json_rows(tensor.get("data"), shape, meta, nan_policy, f"{field}.data")
            out[:, numeric] = x
        else:
            out[:, cats] = _text_rows(given, tensor.get("data"), shape, nan_policy, f"{field}.data")
    assert out is not None
    return out


def _check_names(inputs: Any) -> None:
    """Every name among ``inputs`` that is given is a string (a list or an object is no key to
    look a tensor up by); else the 400 naming the first that is not."""
    for k, tensor in enumerate(inputs if isinstance(inputs, list) else []):
        name = tensor.get("name") if isinstance(tensor, dict) else None
        if name is not None and not isinstance(name, str):
            raise RequestError(400, "wrong_type", f"inputs[{k}].name",
                               f"inputs[{k}].name: expected a string, got {type_name(name)} {preview(name)}")


def _text_rows(given: TensorValues | None, data: Any, shape: list[int], nan_policy: NanPolicy,
               field: str) -> list[list[Any]]:
    """A BYTES tensor as rows of strings: JSON strings (null: missing, per ``nan_policy``), or
    elements sent as bytes (each a 4-byte little-endian length and its bytes, as Triton writes
    them, or gRPC's ``bytes_contents``), which must be UTF-8."""
    if given is None:
        if not isinstance(data, list):
            raise RequestError(400, "wrong_type", field, f"{field}: expected an array of strings")
        rows = _matrix_rows(data, shape, field)
        check_text(rows, nan_policy, lambda i, j: f"{field}[{i * shape[1] + j}]")
        return rows
    elements = _byte_elements(given.values, given.field) if isinstance(given.values, bytes) else list(given.values)
    count = math.prod(shape)
    if len(elements) != count:
        raise RequestError(400, "wrong_shape", given.field,
                           f"{given.field}: {len(elements)} elements do not hold BYTES {shape} ({count} values)")
    text: list[str] = []
    for i, element in enumerate(elements):
        try:
            text.append(bytes(element).decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(400, "wrong_type", f"{given.field}[{i}]",
                               f"{given.field}[{i}]: not UTF-8 text") from None
    n = shape[1]
    rows = [text[i:i + n] for i in range(0, count, n)]
    check_text(rows, nan_policy, lambda i, j: f"{given.field}[{i * n + j}]")
    return rows


def _byte_elements(blob: bytes, field: str) -> list[bytes]:
    """The elements of a BYTES tensor sent as bytes: each a 4-byte little-endian length, then
    that many bytes."""
    out: list[bytes] = []
    pos = 0
    while pos < len(blob):
        size = int.from_bytes(blob[pos:pos + 4], "little")
        if pos + 4 > len(blob) or pos + 4 + size > len(blob):
            raise RequestError(400, "wrong_shape", field,
                               f"{field}: element {len(out)} at byte {pos} runs past the {len(blob)} bytes sent")
        out.append(blob[pos + 4:pos + 4 + size])
        pos += 4 + size
    return out


def _input_head(doc: dict[str, Any], meta: ModelMetadata, max_rows: int) -> tuple[dict[str, Any], str, list[int]]:
    """The request's one input tensor, its datatype and its shape, checked against the model."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(400, "wrong_shape", "inputs",
                           f"inputs: expected one tensor named {INPUT_NAME!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise RequestError(400, "unknown_input", "inputs[0].name",
                           f"inputs[0].name: unknown input {preview(tensor.get('name'))}; "
                           f"the model's input is {INPUT_NAME!r}")
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str):
        raise RequestError(400, "wrong_type", "inputs[0].datatype",
                           f'inputs[0].datatype: expected a string such as "FP32", got {type_name(datatype)} '
                           f"{preview(datatype)}")
    if datatype not in DATATYPES:
        raise RequestError(400, "wrong_type", "inputs[0].datatype",
                           f"inputs[0].datatype: {preview(datatype)} is not numeric; send FP32")
    shape = tensor.get("shape")
    dims = meta.input_dims
    if len(dims) > 1:
        shape = _check_tensor_shape(shape, dims, meta.n_features)
    elif (not isinstance(shape, list) or len(shape) != 2
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise RequestError(400, "wrong_shape", "inputs[0].shape",
                           f"inputs[0].shape: expected [rows, {meta.n_features}], got {preview(shape)}")
    elif shape[1] != meta.n_features:
        raise RequestError(400, "wrong_shape", "inputs[0].shape",
                           f"inputs[0].shape: expected {meta.n_features} features, got {shape[1]}")
    if not 1 <= shape[0] <= max_rows:
        status, code = (413, "too_many_rows") if shape[0] > max_rows else (400, "empty")
        raise RequestError(status, code, "inputs[0].shape",
                           f"inputs[0].shape: {shape[0]} rows; between 1 and {max_rows} are accepted")
    return tensor, datatype, shape


def _requested_outputs(doc: dict[str, Any], meta: ModelMetadata,
                       default_binary: bool) -> tuple[list[str], dict[str, bool]]:
    """The outputs to answer, in order, and whether each goes binary."""
    wanted = doc.get("outputs")
    names = [o.name for o in meta.outputs]
    default_binary = _flag(_parameters(doc.get("parameters"), "parameters"), "binary_data_output", "parameters",
                           default_binary)
    if wanted is None:
        return names, dict.fromkeys(names, default_binary)
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise RequestError(400, "wrong_type", "outputs", "outputs: expected an array of objects")
    binary_of: dict[str, bool] = {}
    for k, out in enumerate(wanted):
        if out.get("name") not in names:
            raise RequestError(400, "unknown_output", f"outputs[{k}].name",
                               f"outputs[{k}].name: unknown output {preview(out.get('name'))}; the model has {names}")
        field = f"outputs[{k}].parameters"
        binary_of[out["name"]] = _flag(_parameters(out.get("parameters"), field), "binary_data", field, default_binary)
    return list(binary_of), binary_of


def _tensor_values(values: TensorValues, dtype: np.dtype[Any], datatype: str, shape: list[int],
                   count: int) -> np.ndarray:
    """The float32 tensor of values sent as bytes or as a typed array, which must hold exactly
    ``shape``'s values."""
    given = values.values
    n = len(given) // dtype.itemsize if isinstance(given, bytes) else given.size
    if n != count or (isinstance(given, bytes) and len(given) % dtype.itemsize):
        amount = f"{len(given)} bytes" if isinstance(given, bytes) else f"{given.size} values"
        raise RequestError(400, "wrong_shape", values.field,
                           f"{values.field}: {amount} do not hold {datatype} {shape} "
                           f"({count} values)")
    x = np.frombuffer(given, dtype=dtype) if isinstance(given, bytes) else given
    return x.astype(np.float32, copy=False).reshape(shape)


def _request_id(doc: dict[str, Any]) -> str | None:
    rid = doc.get("id")
    if rid is None or rid == "":
        return None
    if not isinstance(rid, str) or len(rid) > 100:
        raise RequestError(400, "wrong_type", "id", "id: expected a string of at most 100 characters")
    return rid


def encode_infer(meta: ModelMetadata, version: int, request_id: str, req: InferRequest,
                 outputs: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The response body and extra headers (binary extension when any output is binary)."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in req.outputs:
        value = np.ascontiguousarray(outputs[name])
        entry: dict[str, Any] = {"name": name, "datatype": oip_datatype(value.dtype), "shape": list(value.shape)}
        if req.binary.get(name):
            blob = value.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = value.reshape(-1)
        entries.append(entry)
    header = orjson.dumps(
        {"model_name": meta.name, "model_version": str(version), "id": request_id, "outputs": entries},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    if not blobs:
        return header, {}
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header))}

