"""Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``, KServe v2 / Triton).

A thin transport over the REST routes' logic: each call is checked by the same
:class:`~serving.app.Routes` (bearer key, served model, request id), decoded by the same
:func:`serving.oip.decode_request` (the message is read into the dict a JSON request parses to),
and runs through the same batcher, events and metrics (route ``grpc_infer``, counted under the
HTTP status the same refusal gets over REST). tritonclient's gRPC client works unchanged::

    client = tritonclient.grpc.InferenceServerClient("localhost:3001")
    client.infer("churn", [InferInput("input", [1, 20], "FP32").set_data_from_numpy(x)])

Tensors come typed (``contents.fp32_contents``, ...) or as ``raw_input_contents``; outputs go back
as ``raw_output_contents`` (what Triton answers and tritonclient reads), or typed ``contents``
when the request sets ``binary_data_output`` false (or every requested output ``binary_data``
false). Refusals carry a gRPC status and the REST message naming the field: INVALID_ARGUMENT,
UNAUTHENTICATED, NOT_FOUND (model), RESOURCE_EXHAUSTED (too large; messages over
``MODELLOOP_SERVING_MAX_BODY_BYTES`` are refused by gRPC itself), UNAVAILABLE (shedding load).

The server runs in each BentoML worker on the same event loop as the HTTP app
(:func:`start_grpc_server`, from ``serving/service.py``); the workers share the port through
``SO_REUSEPORT``, the kernel spreading connections (a gRPC channel stays on one worker).

The generated modules in ``serving/proto`` (``make grpc-stubs``) keep their messages in a
descriptor pool of their own: they declare package ``inference`` as tritonclient's do, and the
default pool refuses a second definition, so a process may load both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np

from modelloop.http import internal_error
from serving import oip
from serving.app import Routes, error_reason
from serving.batcher import Overloaded, retry_after_header
from serving.proto import predict_v2_pb2 as pb
from serving.proto import predict_v2_pb2_grpc as pb_grpc
from serving.sampling import LABEL_EXPECTED_HEADER, labelled
from serving.state import ServingState
from serving.validation import RequestError

logger = logging.getLogger(__name__)

ROUTE = "grpc_infer"
"""The ``route`` label of the request metrics for ModelInfer."""

_STATUS = {401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
           413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.UNAVAILABLE,
           503: grpc.StatusCode.UNAVAILABLE, 507: grpc.StatusCode.RESOURCE_EXHAUSTED}
"""gRPC status of a refusal by its REST status; any other 4xx is INVALID_ARGUMENT."""

# datatype -> the typed contents field that carries it (FP16 has none: raw only)
_TYPED_FIELD = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT32": "int_contents",
                "INT64": "int64_contents", "BYTES": "bytes_contents"}
_CONTENT_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents",
                   "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents")
_NP_FIELD = {np.dtype(np.float32): "fp32_contents", np.dtype(np.float64): "fp64_contents",
             np.dtype(np.int32): "int_contents", np.dtype(np.int64): "int64_contents"}


def _parameters(params: Any) -> dict[str, Any]:
    """A ``map<string, InferParameter>`` as the dict a JSON request holds."""
    return {k: getattr(v, v.WhichOneof("parameter_choice") or "bool_param") for k, v in params.items()}


def request_doc(request: pb.ModelInferRequest) -> dict[str, Any]:
    """The infer request's fields as :func:`serving.oip.decode_request` reads them from JSON."""
    return {
        "id": request.id or None,
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
                    "parameters": _parameters(t.parameters)} for t in request.inputs],
        "outputs": [{"name": o.name, "parameters": _parameters(o.parameters)} for o in request.outputs] or None,
        "parameters": _parameters(request.parameters),
    }


def tensor_values(request: pb.ModelInferRequest) -> Callable[[str, int], oip.TensorValues]:
    """The ``k``-th input's values, raw or typed, for :func:`serving.oip.decode_request` (BYTES
    typed: ``bytes_contents``, a list of the elements)."""

    def values(datatype: str, k: int) -> oip.TensorValues:
        raw = request.raw_input_contents
        contents = request.inputs[k].contents
        sent = [f for f in _CONTENT_FIELDS if len(getattr(contents, f))]
        if raw:
            if sent:
                raise RequestError(400, "wrong_shape", "raw_input_contents",
                                   f"raw_input_contents: sent with inputs[{k}].contents.{sent[0]}; send the "
                                   "values one way, raw or typed")
            if len(raw) != len(request.inputs):
                raise RequestError(400, "wrong_shape", "raw_input_contents",
                                   f"raw_input_contents: {len(raw)} given for {len(request.inputs)} input; "
                                   "send one per input")
            return oip.TensorValues(raw[k], f"raw_input_contents[{k}]")
        field = _TYPED_FIELD.get(datatype)
        if field is None:
            raise RequestError(400, "wrong_type", f"inputs[{k}].contents",
                               f"inputs[{k}].contents: {datatype} has no typed contents; send it as "
                               "raw_input_contents")
        other = [f for f in sent if f != field]
        if other:
            raise RequestError(400, "wrong_type", f"inputs[{k}].contents.{other[0]}",
                               f"inputs[{k}].contents.{other[0]}: datatype {datatype} is sent in "
                               f"inputs[{k}].contents.{field}")
        if datatype == "BYTES":
            elements = np.empty(len(contents.bytes_contents), dtype=object)
            elements[:] = list(contents.bytes_contents)
            return oip.TensorValues(elements, f"inputs[{k}].contents.{field}")
        dtype = oip.DATATYPES[datatype]
        return oip.TensorValues(np.array(getattr(contents, field), dtype=dtype),
                                f"inputs[{k}].contents.{field}")

    return values


def _elements(value: np.ndarray) -> list[bytes]:
    """A BYTES tensor's elements (strings of a model's label output) as bytes, row-major."""
    return [v if isinstance(v, bytes) else str(v).encode() for v in value.reshape(-1).tolist()]


def encode_response(meta: Any, version: int, request_id: str, req: oip.InferRequest,
                    outputs: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    """The ModelInferResponse: raw output contents (every output: the protocol allows no mix)
    unless no output asked for binary and every one has a typed field (FP16 has none). A BYTES
    output goes raw as Triton writes it (each element's 4-byte little-endian length, then its
    bytes), or typed in ``bytes_contents``."""
    raw = any(req.binary.get(name) for name in req.outputs) or any(
        np.dtype(outputs[name].dtype) not in _NP_FIELD and oip.oip_datatype(outputs[name].dtype) != "BYTES"
        for name in req.outputs)
    response = pb.ModelInferResponse(model_name=meta.name, model_version=str(version), id=request_id)
    for name in req.outputs:
        value = np.ascontiguousarray(outputs[name])
        datatype = oip.oip_datatype(value.dtype)
        tensor = response.outputs.add(name=name, datatype=datatype, shape=value.shape)
        if datatype == "BYTES":
            elements = _elements(value)
            if raw:
                response.raw_output_contents.append(
                    b"".join(len(e).to_bytes(4, "little") + e for e in elements))
            else:
                tensor.contents.bytes_contents.extend(elements)
        elif raw:
            response.raw_output_contents.append(value.tobytes())
        else:
            getattr(tensor.contents, _NP_FIELD[value.dtype]).extend(value.reshape(-1).tolist())
    return response


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


Call = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The six calls of the protocol, bound to one worker's state."""

    def __init__(self, state: ServingState) -> None:
        self.state = state
        self.routes = Routes(state)

    async def _guarded(self, request: Any, context: grpc.aio.ServicerContext, call: Call,
                       route: str = "", auth: bool = True) -> Any:
        """Auth, error mapping and request metrics around a call (as ``Routes.guarded``)."""
        state = self.state
        start = time.perf_counter()
        code = 200
        try:
            if auth:
                self.routes.check_authorization(_metadata(context).get("authorization", ""))
            return await call(request, context)
        except RequestError as exc:
            code = exc.status
            state.count_error(self._label(request), error_reason(exc))
            await context.abort(_STATUS.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT), exc.message)
        except Overloaded as exc:
            code = 503
            state.count_error(self._label(request), "overloaded")
            context.set_trailing_metadata((("retry-after", retry_after_header(exc.retry_after_s)),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"overloaded: {exc}; retry later")
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # a bug: logged under an id the message names, as the REST routes' 500
            code = 500
            error = internal_error(logger, f"gRPC {type(request).__name__}", exc, "the server's log")
            state.count_error(self._label(request), "internal")
            await context.abort(grpc.StatusCode.INTERNAL, error.message)
        finally:
            if route:
                state.observe_request(self._label(request), route, code, time.perf_counter() - start)

    def _label(self, request: Any) -> str:
        """The ``model`` label of a call's metrics (only names served here)."""
        name = getattr(request, "model_name", None) or getattr(request, "name", None)
        return self.state.repository.label(name or None)

    # -- health and metadata (as GET /v2, /v2/health/*, /v2/models/{name}[/ready]) --------------
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.state.ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(**oip.server_metadata())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def call(request: Any, context: Any) -> Any:
            return pb.ModelReadyResponse(ready=self.routes.ready_of(request.name, request.version))

        return await self._guarded(request, context, call)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def call(request: Any, context: Any) -> Any:
            meta = await self.routes.metadata_of(request.name, request.version)
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]])

        return await self._guarded(request, context, call)

    # -- inference (as POST /v2/models/{name}/infer) ----------------------------------------------
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._guarded(request, context, self._infer, route=ROUTE)

    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        routes = self.routes
        served = await routes.acquire(request.model_name)
        try:
            runtime = routes.check_version(served, request.model_version)

            def decode(runtime: Any) -> oip.InferRequest:
                return oip.decode_request(request_doc(request), runtime.metadata, nan_policy=routes.nan_policy,
                                          max_rows=routes.max_rows, values=tensor_values(request),
                                          default_binary=True)

            req = decode(runtime)
            metadata = _metadata(context)
            rid = labelled(routes.checked_request_id(req.id, metadata.get("x-request-id")),
                           metadata.get(LABEL_EXPECTED_HEADER))
            result = await routes.infer_rows(served, req, runtime, rid, start, request.model_version,
                                             decode)
        finally:
            self.state.repository.release(served)
        runtime = result.runtime
        return encode_response(runtime.metadata, runtime.model_version, rid, req, result.outputs)


async def start_grpc_server(state: ServingState) -> grpc.aio.Server:
    """Start the gRPC server of this worker on ``MODELLOOP_SERVING_GRPC_PORT`` and ``host``.
    Requests over ``max_body_bytes`` are refused with RESOURCE_EXHAUSTED."""
    s = state.settings
    limit = s.max_body_bytes
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.so_reuseport", 1),  # every worker listens on the port; the kernel spreads connections
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state), server)
    address = f"{s.host}:{s.grpc_port}" if ":" not in s.host else f"[{s.host}]:{s.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot listen on {address}: {exc}") from None
    await server.start()
    logger.info("gRPC (Open Inference Protocol) on %s", address)
    return server
