"""Serving's OpenAPI 3.1 document, built once when the app is made and merged into BentoML's
``/docs.json`` (:func:`merge_into`), beside BentoML's own health and metrics routes.

Bodies are described by the pydantic models below. They do not validate (the routes check
requests by hand, cheaply, in :mod:`serving.validation` and :mod:`serving.oip`): they are
held to what those checks accept and what the routes answer by tests/serving/test_openapi.py,
which drives a real server with schemathesis and sends a table of known requests. A body the
schema allows may still be refused (a model takes its own features and shape: see
``GET /v2/models/{name}``); a body the schema refuses is refused with a 4xx.

The app hands in its own route table (path, method, guarded), so a route without a
description here stops the app from being made, and a guarded route's operation names the
bearer key.

Example (what :func:`serving.app.build_app` does with its table of routes)::

    doc = openapi_document((path, method, guarded) for path, method, _, guarded, _ in table)
    doc["paths"]["/predict"]["post"]["security"]   # [{"apiKey": []}]
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema, models_json_schema

from modelloop import __version__
from modelloop.schemas import CATEGORIES_INPUT, INPUT_NAME

_REF = "#/components/schemas/{model}"
_NonNegative = Annotated[int, Field(ge=0)]
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,100}$"
"""What ``X-Request-ID`` (and an inference request's ``id``) may be: it names the rows' events
(:meth:`serving.app.Routes.request_id` checks it)."""


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- /predict -----------------------------------------------------------------------------------
class PredictRequest(_Closed):
    """Rows to predict: records by feature name, arrays in the order of the model's
    ``feature_names``, or (image and sequence models) tensors nested to the input's shape.
    A value is a number, or null for a missing one (imputed by the graph, or refused under
    ``nan_policy=reject``); a categorical feature's value is a string (``ModelMetadata.categories``;
    one the model does not know takes its unknown code). At most ``MAX_ROWS_PER_REQUEST`` rows
    (more: 413)."""

    instances: list[dict[str, float | str | None] | list[float | str | None] | list[list[Any]]] = Field(
        min_length=1)


class Prediction(_Closed):
    """One row's answer; ``label`` and ``probabilities`` for a classifier only."""

    request_id: str = Field(description="`<request id>-<row>`: feedback joins on it")
    prediction: float = Field(description="The class index, the regression value or the score")
    label: str | SkipJsonSchema[None] = None
    probabilities: dict[str, float] | SkipJsonSchema[None] = Field(
        None, description="Each class label's probability")


class PredictResponse(_Closed):
    model: str
    version: int
    request_id: str
    predictions: list[Prediction]


# -- Open Inference Protocol v2 (names as in KServe's and Triton's specification) ---------------
class ServerMetadataResponse(_Closed):
    name: str
    version: str
    extensions: list[str]


class ServerLiveResponse(_Closed):
    live: bool


class ServerReadyResponse(_Closed):
    ready: bool


class ModelReadyResponse(_Closed):
    name: str
    ready: bool


class TensorMetadata(_Closed):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for an axis of any length (rows, a sequence's steps)")


class ModelMetadataResponse(_Closed):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InputParameters(_Open):
    binary_data_size: _NonNegative | None = Field(
        None, description="The tensor's bytes in the binary part of the body (the binary tensor "
                          "data extension); none: its values are in `data`")


class RequestInput(_Open):
    name: Literal[INPUT_NAME, CATEGORIES_INPUT] = Field(  # type: ignore[valid-type]
        description=f"`{INPUT_NAME}`; a model with categorical features also takes `{CATEGORIES_INPUT}`, "
                    "their strings (BYTES `[rows, n_categorical]`)")
    shape: list[_NonNegative] = Field(
        description="`[rows, n_features]`, or the model's input shape with its rows "
                    "(`GET /v2/models/{name}`)")
    datatype: Literal["FP32", "FP64", "INT32", "INT64", "FP16", "BYTES"]
    parameters: InputParameters | None = None
    data: list[Any] | SkipJsonSchema[None] = Field(
        None, description="The values, flat in row-major order or nested to the shape; numbers, "
                          "or null for a missing one; strings for `categories`")


class OutputParameters(_Open):
    binary_data: bool = Field(False, description="Answer this output in the binary part")


class RequestOutput(_Open):
    name: str
    parameters: OutputParameters | None = None


class RequestParameters(_Open):
    binary_data_output: bool = Field(False, description="Answer every output in the binary part")


class InferenceRequest(_Open):
    """One input tensor (``input``); the outputs wanted (all by default)."""

    id: str | None = Field(None, pattern=REQUEST_ID_PATTERN.replace("{1,", "{0,"),
                           description="Names the rows' events `<id>-<row>`; echoed")
    parameters: RequestParameters | None = None
    inputs: list[RequestInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseParameters(_Closed):
    binary_data_size: _NonNegative


class ResponseOutput(_Closed):
    name: str
    datatype: str
    shape: list[int]
    data: list[float] | SkipJsonSchema[None] = None
    parameters: ResponseParameters | SkipJsonSchema[None] = None


class InferenceResponse(_Closed):
    model_name: str
    model_version: str
    id: str
    outputs: list[ResponseOutput]


# -- explanations (serving/explain.py) ----------------------------------------------------------
class InstanceExplanation(_Closed):
    """One instance: each explained output (``probability_<label>`` per class, ``prediction`` or
    ``score``), its base value (the mean over the background) and each feature's attribution;
    ``base_value + sum(attributions) == value`` within ``additivity_tolerance``."""

    values: dict[str, float]
    base_values: dict[str, float]
    attributions: dict[str, dict[str, float]] = Field(description="output -> feature -> attribution")
    additivity_error: float = Field(description="max over outputs of |base + sum(attributions) - value|")


class ExplainAbout(_Closed):
    explainer: Literal["permutation"]
    background_rows: _NonNegative = Field(description="Reference rows the masked features come from")
    permutations: _NonNegative = Field(description="Feature permutations per instance")
    evaluations_per_instance: _NonNegative = Field(description="Rows run through the graph per instance")
    additivity_tolerance: float


class ExplainResponse(ExplainAbout):
    model: str
    version: int
    request_id: str
    explanations: list[InstanceExplanation]


class OipExplainParameters(ExplainAbout):
    feature_names: list[str]
    output_names: list[str] = Field(description="The explained outputs, the last axis of each tensor")
    additivity_error: float


class OipExplainResponse(_Closed):
    """Tensors ``attributions`` ``[rows, features, outputs]``, ``base_values`` and ``values``
    ``[rows, outputs]`` (FP64)."""

    model_name: str
    model_version: str
    id: str
    parameters: OipExplainParameters
    outputs: list[ResponseOutput]


# -- batch jobs ---------------------------------------------------------------------------------
class JobStatus(_Closed):
    job_id: str
    state: Literal["uploading", "queued", "running", "succeeded", "failed", "lost"]
    format: Literal["csv", "parquet"]
    input_bytes: _NonNegative
    model: str
    version: int
    rows_done: _NonNegative
    error: str | None
    created_at: float
    started_at: float | SkipJsonSchema[None] = None
    finished_at: float | None
    seconds: float | SkipJsonSchema[None] = None
    pid: int


class JobDeleted(_Closed):
    job_id: str
    deleted: Literal[True]


# -- admin --------------------------------------------------------------------------------------
class LastReload(_Closed):
    version: int | None
    result: Literal["success", "failure"] | None
    error: str | None
    at: float | None


class ModelStatus(_Closed):
    """The served version and the last swap (``POST /admin/reload`` checks the alias first)."""

    model: str
    alias: str
    version: int | None
    provider: str | None
    ready: bool
    last_reload: LastReload


class CanaryStatus(ModelStatus):
    """The canary version served beside production (``alias`` ``canary``) and its share."""

    share: float = Field(ge=0, le=1, description="Share of request ids it answers (sticky by id)")


class ShadowStatus(ModelStatus):
    """The challenger scoring a copy of production's traffic (alias ``challenger``,
    serving/shadow.py) and the rows waiting for it."""

    queued_rows: _NonNegative


class AdminModelStatus(ModelStatus):
    """:class:`ModelStatus`, the canary and the shadow (each null when none is served) and this
    worker's queue and event counters."""

    canary: CanaryStatus | None
    shadow: ShadowStatus | None
    queued_rows: _NonNegative
    events_pending: _NonNegative
    events_sent: _NonNegative
    events_dropped: dict[str, _NonNegative] = Field(description="Events dropped, by reason")


# -- the model repository extension (KServe's and Triton's) --------------------------------------
class RepositoryIndexRequest(_Closed):
    ready: bool | SkipJsonSchema[None] = Field(None, description="true: only the models ready now")


class RepositoryModel(_Closed):
    """A served model: ``READY`` (loaded), or ``UNAVAILABLE`` with the reason (not loaded yet,
    unloaded, or why its load failed)."""

    name: str
    version: str = Field(description="The loaded version; empty when it is not loaded")
    state: Literal["READY", "UNAVAILABLE"]
    reason: str


class RepositoryDone(_Closed):
    """A load or unload that is done (an empty object)."""


class Error(_Closed):
    """A refused request: the problem, its kind and the field it concerns (the shape both apps
    answer, modelloop/http.py)."""

    error: str = Field(description="`<field>: <problem>`, showing at most 40 characters of a value")
    code: str = Field(description="`malformed_json`, `wrong_type`, `wrong_shape`, `missing_feature`, "
                                  "`unknown_feature`, `not_finite`, `too_many_rows`, `not_found`, ...")
    field: str | None = Field(description="`body`, `instances[2].f03`, `inputs[0].shape`, a header, ...; "
                                          "null for an internal error")
    errors: list[str] = Field(description="Every problem found; serving names one, `error`")
    error_id: str | None = Field(None, description="An internal error's (500) id, which the server's log "
                                                   "line of its traceback names")


# -- operations ---------------------------------------------------------------------------------
Content = dict[str, dict[str, Any]]
"""Media type -> schema."""


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    ok: dict[int, Content]
    """Status -> content of each answer that is not an :class:`Error`."""
    errors: tuple[int, ...] = ()
    body: Content | None = None
    params: list[dict[str, Any]] = field(default_factory=list)
    headers: dict[int, tuple[str, ...]] = field(default_factory=dict)
    """Status -> the response headers it carries (:data:`_HEADERS`)."""


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(model=name)}


def _json(name: str) -> Content:
    return {"application/json": {"schema": _ref(name)}}


def _path(name: str, what: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": what, "schema": schema}


_SEGMENT = {"type": "string", "pattern": "^[^/]+$"}
_MODEL = _path("name", "The served model's name", _SEGMENT)
_VERSION = _path("version", "The served version", _SEGMENT)
_JOB = _path("job_id", "The job's id (24 hex digits)", {"type": "string", "pattern": "^[0-9a-f]{24}$"})
_REQUEST_ID_HEADER = {"name": "X-Request-ID", "in": "header", "required": False,
                      "description": "Names the rows' events `<id>-<row>` (one is made otherwise)",
                      "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN}}
_FORMAT = {"name": "format", "in": "query", "required": False,
           "description": "The file's format when its Content-Type does not say",
           "schema": {"type": "string", "enum": ["csv", "parquet"]}}
_HEADER_LENGTH = {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                  "description": "The binary tensor data extension: the body is this many bytes of "
                                 "JSON (an InferenceRequest) followed by the tensors' bytes",
                  "schema": {"type": "string", "pattern": "^[0-9]+$"}}
_PARQUET = "application/vnd.apache.parquet"
_FILES: Content = {"text/csv": {"schema": {"type": "string"}},
                   _PARQUET: {"schema": {"type": "string", "format": "binary"}}}
_BINARY: Content = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_BAD_BODY = (400, 413, 415, 422)
"""Unreadable (not JSON, a bad Content-Length), over ``MAX_BODY_BYTES``, in a Content-Encoding,
not fitting the model."""



def _infer(summary: str, *path: dict[str, Any]) -> Operation:
    return Operation(summary, "oip", {200: {**_json("InferenceResponse"), **_BINARY}},
                     (*_BAD_BODY, 404, 503), body={**_json("InferenceRequest"), **_BINARY},
                     params=[*path, _HEADER_LENGTH, _REQUEST_ID_HEADER],
                     headers={200: ("Inference-Header-Content-Length",)})


def _oip_explain(summary: str, *path: dict[str, Any]) -> Operation:
    return Operation(summary, "explain", {200: _json("OipExplainResponse")}, (*_BAD_BODY, 404, 503),
                     body=_json("InferenceRequest"), params=[*path, _HEADER_LENGTH, _REQUEST_ID_HEADER])


OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/predict"): Operation(
        "Predict rows: records or arrays of features (or tensors) in, a prediction per row out",
        "prediction", {200: _json("PredictResponse")}, (*_BAD_BODY, 503),
        body=_json("PredictRequest"), params=[_REQUEST_ID_HEADER],
        headers={200: ("X-Request-ID",)}),
    ("GET", "/v2"): Operation("OIP server metadata", "oip", {200: _json("ServerMetadataResponse")}),
    ("GET", "/v2/health/live"): Operation("OIP liveness", "oip", {200: _json("ServerLiveResponse")}),
    ("GET", "/v2/health/ready"): Operation(
        "OIP readiness (503 until the model is loaded)", "oip",
        {200: _json("ServerReadyResponse"), 503: _json("ServerReadyResponse")}),
    ("GET", "/v2/models/{name}"): Operation(
        "OIP model metadata: the input and outputs with datatypes and shapes", "oip",
        {200: _json("ModelMetadataResponse")}, (404, 503), params=[_MODEL]),
    ("GET", "/v2/models/{name}/versions/{version}"): Operation(
        "OIP model metadata of a version (the served one)", "oip",
        {200: _json("ModelMetadataResponse")}, (404, 503), params=[_MODEL, _VERSION]),
    ("GET", "/v2/models/{name}/ready"): Operation(
        "OIP model readiness", "oip",
        {200: _json("ModelReadyResponse"), 503: _json("ModelReadyResponse")}, (404,),
        params=[_MODEL]),
    ("GET", "/v2/models/{name}/versions/{version}/ready"): Operation(
        "OIP readiness of a version (the served one)", "oip",
        {200: _json("ModelReadyResponse"), 503: _json("ModelReadyResponse")}, (404,),
        params=[_MODEL, _VERSION]),
    ("POST", "/v2/models/{name}/infer"): _infer(
        "OIP inference: JSON tensors, or the binary tensor data extension", _MODEL),
    ("POST", "/v2/models/{name}/versions/{version}/infer"): _infer(
        "OIP inference on a version (the served one)", _MODEL, _VERSION),
    ("POST", "/explain"): Operation(
        "Explain rows (as /predict takes them): per-feature SHAP attributions of each explained "
        "output, computed on the served graph", "explain", {200: _json("ExplainResponse")},
        (*_BAD_BODY, 404, 503), body=_json("PredictRequest"), params=[_REQUEST_ID_HEADER],
        headers={200: ("X-Request-ID",)}),
    ("POST", "/v2/models/{name}/explain"): _oip_explain(
        "Explain an OIP inference request's rows: SHAP attributions as tensors", _MODEL),
    ("POST", "/v2/models/{name}/versions/{version}/explain"): _oip_explain(
        "Explain on a version (the served one)", _MODEL, _VERSION),
    ("POST", "/batch/score"): Operation(
        "Score a CSV or Parquet file at once (up to SYNC_BATCH_MAX_ROWS rows): the same format "
        "back, with prediction, label and probability_<label> columns", "batch",
        {200: _FILES}, (*_BAD_BODY, 404, 503), body=_FILES, params=[_FORMAT, _REQUEST_ID_HEADER],
        headers={200: ("X-Request-ID", "X-Model-Version")}),
    ("POST", "/batch/jobs"): Operation(
        "Submit a CSV or Parquet file to be scored in the background (streamed to disk)", "batch",
        {202: _json("JobStatus")}, (400, 404, 413, 415, 422, 429, 503, 507), body=_FILES, params=[_FORMAT],
        headers={202: ("Location",)}),
    ("GET", "/batch/jobs/{job_id}"): Operation(
        "A job's status and rows done", "batch", {200: _json("JobStatus")}, (404,), params=[_JOB]),
    ("DELETE", "/batch/jobs/{job_id}"): Operation(
        "Delete a finished job and its files (409 while it is at work)", "batch",
        {200: _json("JobDeleted")}, (404, 409), params=[_JOB]),
    ("GET", "/batch/jobs/{job_id}/result"): Operation(
        "A succeeded job's scored file (409 before)", "batch", {200: _FILES}, (404, 409),
        params=[_JOB]),
    ("GET", "/admin/model"): Operation(
        "The served version, its provider, the last swap, the canary, the queue and event counters", "admin",
        {200: _json("AdminModelStatus")}, (404, 503)),
    ("POST", "/models/{name}/predict"): Operation(
        "Predict rows with any served model (as /predict, which serves the default one); it "
        "loads on its first request", "prediction", {200: _json("PredictResponse")},
        (*_BAD_BODY, 404, 503), body=_json("PredictRequest"), params=[_MODEL, _REQUEST_ID_HEADER],
        headers={200: ("X-Request-ID",)}),
    ("POST", "/v2/repository/index"): Operation(
        "OIP model repository: every served model, READY or UNAVAILABLE with the reason",
        "repository", {200: {"application/json": {"schema": {
            "type": "array", "items": _ref("RepositoryModel")}}}}, (400, 413, 415, 422),
        body=_json("RepositoryIndexRequest")),
    ("POST", "/v2/repository/models/{name}/load"): Operation(
        "Load a served model now (again after an unload or a failed load); 503 says why it "
        "failed", "repository", {200: _json("RepositoryDone")}, (404, 503), params=[_MODEL]),
    ("POST", "/v2/repository/models/{name}/unload"): Operation(
        "Unload a model after its requests in flight; it answers 503 until it is loaded again",
        "repository", {200: _json("RepositoryDone")}, (404,), params=[_MODEL]),
    ("POST", "/admin/reload"): Operation(
        "Check the alias now and swap to the version it names", "admin", {200: _json("ModelStatus")},
        (404, 503)),
}

_TAGS = {
    "prediction": "The simple JSON prediction route",
    "oip": "Open Inference Protocol v2 (KServe, Triton): tritonclient works unchanged",
    "batch": "Batch scoring of CSV and Parquet files",
    "explain": "Per-feature attributions (permutation SHAP) of the served graph",
    "admin": "The served model and its swaps",
    "repository": "The OIP model repository extension: the served models, loaded and unloaded",
}
_ERROR_TEXT = {
    400: "Unreadable: not JSON, a bad Content-Length, an OIP request that does not fit the model",
    401: "No bearer token, or a wrong one (`WWW-Authenticate: Bearer`)",
    404: "No such model, version or job (or no such path)",
    409: "The job is not finished (no result yet, or not deletable)",
    413: "Over `MAX_BODY_BYTES`, `MAX_ROWS_PER_REQUEST`, `SYNC_BATCH_MAX_ROWS`, "
         "`EXPLAIN_MAX_EVALS` or a quota",
    415: "A `Content-Encoding` (send bodies uncompressed), or a file type other than CSV or Parquet",
    422: "Does not fit the model's schema; `field` names the value",
    429: "`MAX_ACTIVE_JOBS` jobs are at work: retry after `Retry-After` seconds",
    503: "Overloaded: the worker's queue is full; retry after `Retry-After` seconds. Or the "
         "model is unavailable: unloaded, or its load failed (`error` names it and why)",
    507: "The jobs' files fill `MAX_JOBS_DISK_BYTES`: delete finished jobs, or retry after "
         "`Retry-After` seconds",
}
_OK_TEXT = {200: "OK", 202: "Job queued", 503: "Not ready"}
_STRING = {"schema": {"type": "string"}}
_HEADERS = {
    "Retry-After": {"description": "Seconds to wait before trying again", **_STRING},
    "WWW-Authenticate": {"description": "`Bearer`", **_STRING},
    "X-Request-ID": {"description": "The request's id (its rows are `<id>-<row>`)", **_STRING},
    "X-Model-Version": {"description": "The version that scored the file", **_STRING},
    "Location": {"description": "The job's status URL", **_STRING},
    "Inference-Header-Content-Length": {
        "description": "With binary outputs: the length of the JSON header before their bytes",
        **_STRING},
}
_ERROR_HEADERS = {401: ("WWW-Authenticate",), 429: ("Retry-After",), 503: ("Retry-After",),
                  507: ("Retry-After",)}
SCHEMA_MODELS: list[type[BaseModel]] = [
    PredictRequest, PredictResponse, ServerMetadataResponse, ServerLiveResponse,
    ServerReadyResponse, ModelReadyResponse, ModelMetadataResponse, InferenceRequest,
    InferenceResponse, ExplainResponse, OipExplainResponse, JobStatus, JobDeleted, ModelStatus, AdminModelStatus, RepositoryIndexRequest,
    RepositoryModel, RepositoryDone, Error]


def _components() -> dict[str, Any]:
    _, top = models_json_schema([(m, "validation") for m in SCHEMA_MODELS], ref_template=_REF)
    return {
        "schemas": dict(sorted(top["$defs"].items())),
        "securitySchemes": {"apiKey": {
            "type": "http", "scheme": "bearer",
            "description": "MODELLOOP_SERVING_API_KEY (routes are open while it is not set)"}},
    }


def _headers(names: tuple[str, ...]) -> dict[str, Any]:
    return {"headers": {name: _HEADERS[name] for name in names}} if names else {}


def _responses(op: Operation, guarded: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, content in op.ok.items():
        out[str(status)] = {"description": _OK_TEXT[status], "content": content,
                            **_headers(op.headers.get(status, ()))}
    for status in sorted({*op.errors, *((401,) if guarded else ())}):
        out[str(status)] = {"description": _ERROR_TEXT[status], "content": _json("Error"),
                            **_headers(_ERROR_HEADERS.get(status, ()))}
    return dict(sorted(out.items()))


def openapi_document(routes: Iterable[tuple[str, str, bool]]) -> dict[str, Any]:
    """The document for the app's ``(path, method, guarded)`` routes."""
    paths: dict[str, dict[str, Any]] = {}
    routed = set()
    for path, method, guarded in routes:
        op = OPERATIONS.get((method, path))
        if op is None:
            raise LookupError(f"{method} {path} has no description in serving/openapi.py")
        routed.add((method, path))
        entry: dict[str, Any] = {
            "operationId": re.sub(r"[^a-z0-9]+", "_", f"{method} {path}".lower()).strip("_"),
            "summary": op.summary,
            "tags": [op.tag],
            "security": [{"apiKey": []}] if guarded else [],
            "responses": _responses(op, guarded),
        }
        if op.params:
            entry["parameters"] = op.params
        if op.body is not None:
            entry["requestBody"] = {"required": True, "content": op.body}
        paths.setdefault(path, {})[method.lower()] = entry
    if missing := set(OPERATIONS) - routed:
        raise LookupError(f"described but not routed: {sorted(missing)}")
    return {
        "openapi": "3.1.0",
        "info": {"title": "modelloop serving", "version": __version__,
                 "description": "Predictions (JSON `/predict` and the Open Inference Protocol v2), "
                                "batch scoring and the served model. Guarded routes take "
                                "`Authorization: Bearer <MODELLOOP_SERVING_API_KEY>` once that is "
                                "set; every refusal is an `Error` with a 4xx status."},
        "tags": [{"name": name, "description": what} for name, what in _TAGS.items()],
        "paths": dict(sorted(paths.items())),
        "components": _components(),
    }


def merge_into(bento: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """BentoML's document (its health, metrics and service routes) with ours merged in, as
    OpenAPI 3.1 (what BentoML's pydantic schemas are already written in, though it says 3.0.2).
    A path or schema that both name is an error rather than one hiding the other."""
    clash = set(bento.get("paths", {})) & set(ours["paths"])
    bento_components = bento.get("components") or {}
    clash |= set(bento_components.get("schemas", {})) & set(ours["components"]["schemas"])
    if clash:
        raise ValueError(f"BentoML's document and serving's both describe {sorted(clash)}")
    return {
        **bento,
        "openapi": ours["openapi"],
        "info": {**bento.get("info", {}), **ours["info"]},
        "tags": [*bento.get("tags", []), *ours["tags"]],
        "paths": {**bento.get("paths", {}), **ours["paths"]},
        "components": {
            **bento_components,
            "schemas": {**bento_components.get("schemas", {}), **ours["components"]["schemas"]},
            "securitySchemes": ours["components"]["securitySchemes"],
        },
    }

