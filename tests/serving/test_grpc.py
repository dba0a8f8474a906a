"""The Open Inference Protocol over gRPC: a real `modelloop serve` (2 workers, auth on, events to
the recording sidecar, gRPC on a port of its own) driven by tritonclient's gRPC client, and by
tritonclient's generated stub where a request must be built by hand (typed contents, broken
requests). Its answers are the REST /v2 answers for the same rows.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelloop.synthetic import SyntheticTask
from tests.serving.conftest import (
    FEATURES,
    KEY,
    MODEL,
    MODELLOOP,
    Server,
    Sidecar,
    free_port,
    start_server,
    stop_server,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("show_log_on_failure")]

AUTH = {"authorization": f"Bearer {KEY}"}  # gRPC metadata keys are lower case
METADATA = tuple(AUTH.items())
MAX_ROWS = 2000
MAX_BODY = 200_000  # bytes: 2,500 rows of 20 float32 values




@pytest.fixture(scope="module")
def server(main_home: Path, sidecar: Sidecar, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "MODELLOOP_SERVING_API_KEY": KEY,
        "MODELLOOP_SERVING_NAN_POLICY": "reject",
        "MODELLOOP_SERVING_SIDECAR_URL": sidecar.url,
        "MODELLOOP_SERVING_EVENT_FLUSH_INTERVAL_S": "0.1",
        "MODELLOOP_SERVING_MAX_ROWS_PER_REQUEST": str(MAX_ROWS),
        "MODELLOOP_SERVING_MAX_BODY_BYTES": str(MAX_BODY),
    }
    grpc_port = free_port()
    srv = start_server(main_home, tmp_path_factory.mktemp("log") / "server.log", env, "--workers", "2",
                       "--grpc-port", str(grpc_port))
    srv.env["GRPC"] = f"127.0.0.1:{grpc_port}"
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[tgrpc.InferenceServerClient]:
    c = tgrpc.InferenceServerClient(server.env["GRPC"])
    # the workers start their gRPC servers as they start: wait for one to answer
    wait_until(lambda: _live(c), 30, "the gRPC server to answer", interval=0.2)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server: Server, client: tgrpc.InferenceServerClient) -> Iterator[Any]:
    """tritonclient's generated stub, for requests its client does not build."""
    with grpc.insecure_channel(server.env["GRPC"]) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def rest(server: Server) -> Iterator[thttp.InferenceServerClient]:
    c = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


def _live(c: tgrpc.InferenceServerClient) -> bool:
    try:
        return bool(c.is_server_live())
    except tgrpc.InferenceServerException:
        return False


def rows(n: int, seed: int = 7) -> np.ndarray:
    df = SyntheticTask(n_features=20, n_classes=3).sample(n, seed=seed)
    return df[FEATURES].to_numpy(np.float32)


def rest_answer(rest: thttp.InferenceServerClient, x: np.ndarray) -> np.ndarray:
    inp = thttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return rest.infer(MODEL, [inp], headers={"Authorization": f"Bearer {KEY}"}).as_numpy("probabilities")


def grpc_input(x: np.ndarray, datatype: str = "FP32") -> tgrpc.InferInput:
    inp = tgrpc.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def typed_request(x: np.ndarray, **changes: Any) -> Any:
    """A ModelInferRequest with the rows as typed ``fp32_contents``."""
    req = pb.ModelInferRequest(model_name=MODEL)
    tensor = req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    for key, value in changes.items():
        setattr(req, key, value)
    return req


# -- health and metadata ------------------------------------------------------------------------
def test_health_and_metadata_as_over_rest(client: tgrpc.InferenceServerClient,
                                           rest: thttp.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()  # open, as /v2/health/ready
    assert client.is_model_ready(MODEL, headers=AUTH)
    assert client.is_model_ready(MODEL, "1", headers=AUTH)
    headers = {"Authorization": f"Bearer {KEY}"}
    meta = client.get_model_metadata(MODEL, headers=AUTH)

    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    assert {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
            "inputs": tensors(meta.inputs), "outputs": tensors(meta.outputs)} == rest.get_model_metadata(
        MODEL, headers=headers)
    server = client.get_server_metadata(as_json=True)
    assert (server["name"], server["extensions"]) == ("modelloop", ["binary_tensor_data"])


# -- inference ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 1024])
def test_raw_infer_equals_rest(client: tgrpc.InferenceServerClient, rest: thttp.InferenceServerClient,
                               n: int) -> None:
    x = rows(n, seed=n)
    result = client.infer(MODEL, [grpc_input(x)], headers=AUTH, request_id=f"raw-{n}")
    np.testing.assert_array_equal(result.as_numpy("probabilities"), rest_answer(rest, x))
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (MODEL, "1", f"raw-{n}")


def test_typed_contents_in_and_out_equal_rest(stub: Any, rest: thttp.InferenceServerClient) -> None:
    x = rows(5, seed=3)
    expected = rest_answer(rest, x)
    answer = stub.ModelInfer(typed_request(x), metadata=METADATA)  # typed in, raw out (default)
    np.testing.assert_array_equal(np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(5, 3),
                                  expected)
    typed = typed_request(x)
    typed.parameters["binary_data_output"].bool_param = False  # typed out
    answer = stub.ModelInfer(typed, metadata=METADATA)
    assert not answer.raw_output_contents
    (out,) = answer.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("probabilities", "FP32", [5, 3])
    np.testing.assert_array_equal(np.array(out.contents.fp32_contents, np.float32).reshape(5, 3), expected)


def test_fp64_raw_input_is_read_as_over_rest(client: tgrpc.InferenceServerClient,
                                             rest: thttp.InferenceServerClient) -> None:
    x = rows(4, seed=5)
    result = client.infer(MODEL, [grpc_input(x.astype(np.float64), "FP64")], headers=AUTH)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), rest_answer(rest, x))


# -- refusals ---------------------------------------------------------------------------------------
def _status(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _with(x: np.ndarray | Any, edit: Any) -> Any:
    """A request (or the typed request of rows ``x``) changed by ``edit``."""
    req = typed_request(x) if isinstance(x, np.ndarray) else x
    edit(req)
    return req


def _raw(shape: list[int], payload: bytes, datatype: str = "FP32") -> Any:
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="input", datatype=datatype, shape=shape)
    req.raw_input_contents.append(payload)
    return req


X2 = rows(2, seed=9)
NAN = X2.copy()
NAN[1, 4] = np.nan
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("case", "request_", "code", "message"), [
    # the shape does not fit the model's 20 features
    ("features", _raw([2, 19], X2[:, :19].tobytes()), INVALID, "inputs[0].shape: expected 20 features, got 19"),
    # a datatype the model cannot read
    ("datatype", _raw([2, 20], X2.tobytes(), "BYTES"), INVALID, 'inputs[0].datatype: "BYTES" is not numeric'),
    # not the model's input
    ("name", _with(X2, lambda r: setattr(r.inputs[0], "name", "x")), INVALID, "inputs[0].name: unknown input \"x\""),
    # raw bytes of one row for a shape of two
    ("raw size", _raw([2, 20], X2[:1].tobytes()), INVALID, "raw_input_contents[0]: 80 bytes do not hold FP32 [2, 20]"),
    # typed values of two rows for a shape of three
    ("typed size", _with(X2, lambda r: r.inputs[0].shape.__setitem__(0, 3)), INVALID,
     "inputs[0].contents.fp32_contents: 40 values do not hold FP32 [3, 20]"),
    # FP32 values sent in the INT32 field
    ("typed field", _with(X2, lambda r: (r.inputs[0].contents.ClearField("fp32_contents"),
                                         r.inputs[0].contents.int_contents.extend([1] * 40))), INVALID,
     "inputs[0].contents.int_contents: datatype FP32 is sent in inputs[0].contents.fp32_contents"),
    # raw and typed contents together
    ("raw and typed", _with(X2, lambda r: r.raw_input_contents.append(X2.tobytes())), INVALID,
     "raw_input_contents: sent with inputs[0].contents.fp32_contents; send the values one way"),
    # two raw contents for one input
    ("raw count", _with(_raw([2, 20], X2.tobytes()), lambda r: r.raw_input_contents.append(b"")), INVALID,
     "raw_input_contents: 2 given for 1 input; send one per input"),
    # no input at all
    ("no input", pb.ModelInferRequest(model_name=MODEL), INVALID, "inputs: expected one tensor named 'input'"),
    # a request id that cannot name events
    ("id", _with(X2, lambda r: setattr(r, "id", "a b")), INVALID, "id: 1-100 characters of letters"),
    # a parameter of the wrong type
    ("parameter", _with(X2, lambda r: setattr(r.parameters["binary_data_output"], "string_param", "yes")),
     INVALID,
     'parameters.binary_data_output: expected true or false, got string "yes"'),
    # a missing value under nan_policy=reject (REST: 422)
    ("nan", _raw([2, 20], NAN.tobytes()), INVALID, "inputs[0].data: missing value (NaN) at [1, 4]"),
    # an output the model does not have
    ("output", _with(X2, lambda r: r.outputs.add(name="logits")), INVALID, "outputs[0].name: unknown output \"logits\""),
    # a negative dimension
    ("negative", _raw([-1, 20], X2.tobytes()), INVALID, "inputs[0].shape: expected [rows, 20], got [-1, 20]"),
    # another model
    ("model", _with(X2, lambda r: setattr(r, "model_name", "other")), grpc.StatusCode.NOT_FOUND,
     "model_name: model 'other' is not served here (serving 'churn')"),
    # another version
    ("version", _with(X2, lambda r: setattr(r, "model_version", "9")), grpc.StatusCode.NOT_FOUND,
     "model_version: churn v9 is not served (serving v1)"),
    # more rows than MODELLOOP_SERVING_MAX_ROWS_PER_REQUEST
    ("rows", _raw([MAX_ROWS + 1, 20], rows(MAX_ROWS + 1).tobytes()), grpc.StatusCode.RESOURCE_EXHAUSTED,
     f"inputs[0].shape: {MAX_ROWS + 1} rows; between 1 and {MAX_ROWS} are accepted"),
    # a message larger than MODELLOOP_SERVING_MAX_BODY_BYTES (refused by gRPC before it is read)
    ("size", _raw([3000, 20], rows(3000).tobytes()), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "Received message larger than max"),
])
def test_bad_requests_get_a_status_naming_the_field(stub: Any, case: str, request_: Any,
                                                     code: grpc.StatusCode, message: str) -> None:
    got = _status(lambda: stub.ModelInfer(request_, metadata=METADATA))
    assert got[0] == code, got
    assert message in got[1]


def test_tritonclient_reports_invalid_argument_naming_the_input(client: tgrpc.InferenceServerClient) -> None:
    inp = tgrpc.InferInput("input", [2, 20], "INT32")
    inp.set_data_from_numpy(X2.astype(np.int32) * 0)
    result = client.infer(MODEL, [inp], headers=AUTH)  # INT32 is numeric: read as over REST
    assert result.as_numpy("probabilities").shape == (2, 3)
    with pytest.raises(tgrpc.InferenceServerException) as info:
        client.infer(MODEL, [grpc_input(X2[:, :10])], headers=AUTH)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "inputs[0].shape: expected 20 features, got 10" in info.value.message()


# -- auth -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", KEY),),
                                      (("authorization", f"Basic {KEY}"),)])
def test_the_api_key_is_required(stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
    for call in (lambda: stub.ModelInfer(typed_request(X2), metadata=metadata),
                 lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), metadata=metadata),
                 lambda: stub.ModelReady(pb.ModelReadyRequest(name=MODEL), metadata=metadata)):
        code, details = _status(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert details.startswith("Authorization: a valid bearer token is required")
    # health stays open, as over REST
    assert stub.ServerLive(pb.ServerLiveRequest(), metadata=metadata).live


def test_tritonclient_without_the_key_is_refused(client: tgrpc.InferenceServerClient) -> None:
    with pytest.raises(tgrpc.InferenceServerException) as info:
        client.infer(MODEL, [grpc_input(X2)])
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"


# -- events and metrics -----------------------------------------------------------------------------
def test_events_reach_the_sidecar(client: tgrpc.InferenceServerClient, server: Server, sidecar: Sidecar) -> None:
    x = rows(3, seed=21)
    result = client.infer(MODEL, [grpc_input(x)], headers=AUTH, request_id="grpc-evt")
    probabilities = result.as_numpy("probabilities")
    ids = {"grpc-evt-0", "grpc-evt-1", "grpc-evt-2"}
    wait_until(lambda: ids <= {e["request_id"] for e in sidecar.events}, 10, "the sidecar to receive the events")
    by_id = {e["request_id"]: e for e in sidecar.events}
    for i in range(3):
        event = by_id[f"grpc-evt-{i}"]
        assert (event["model"], event["version"], event["mode"]) == (MODEL, 1, "realtime")
        assert event["prediction"] == int(probabilities[i].argmax())
        assert event["features"] == pytest.approx(x[i].tolist())


def test_metrics_count_grpc_requests(client: tgrpc.InferenceServerClient, server: Server) -> None:
    client.infer(MODEL, [grpc_input(X2)], headers=AUTH)
    with pytest.raises(tgrpc.InferenceServerException):
        client.infer(MODEL, [grpc_input(X2[:, :10])], headers=AUTH)
    # two workers: the channel's worker flushes its counts within a tenth of a second
    wait_until(lambda: server.metric("modelloop_serving_requests_total", model=MODEL, route="grpc_infer",
                                     code="200") >= 1, 10, "the gRPC request count")
    wait_until(lambda: server.metric("modelloop_serving_requests_total", model=MODEL, route="grpc_infer",
                                     code="400") >= 1, 10, "the refused gRPC request count")
    assert server.metric("modelloop_serving_rows_total", model=MODEL, mode="realtime") >= 2


# -- encoding (in-process) ----------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False])
def test_string_outputs_go_as_triton_writes_them(binary: bool) -> None:
    """A model's string output (a label, in an imported graph) is a BYTES tensor: raw, each
    element's 4-byte little-endian length then its bytes (tritonclient reads it so), or typed."""
    from types import SimpleNamespace

    from serving import oip, oip_grpc

    outputs = {"label": np.array(["yes", "no"], dtype=object), "probabilities": np.eye(2, dtype=np.float32)}
    req = oip.InferRequest(np.zeros((2, 20), np.float32), None, list(outputs), dict.fromkeys(outputs, binary))
    answer = tgrpc.InferResult(oip_grpc.encode_response(SimpleNamespace(name=MODEL), 1, "r", req, outputs))
    label, probabilities = answer.get_response().outputs
    assert (label.datatype, list(label.shape), probabilities.datatype) == ("BYTES", [2], "FP32")
    if binary:
        assert answer.as_numpy("label").tolist() == [b"yes", b"no"]
        np.testing.assert_array_equal(answer.as_numpy("probabilities"), outputs["probabilities"])
    else:
        assert list(label.contents.bytes_contents) == [b"yes", b"no"]
        assert list(probabilities.contents.fp32_contents) == [1, 0, 0, 1]


# -- start-up -----------------------------------------------------------------------------------------
def test_a_taken_grpc_port_stops_the_server_naming_the_setting(main_home: Path, tmp_path: Path) -> None:
    """Another program holds the port (without SO_REUSEPORT): the server stops with one line
    naming the setting rather than serving REST without the gRPC side it was asked for."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "MODELLOOP_HOME": str(main_home), "BENTOML_HOME": str(tmp_path / "bentoml"),
               "BENTOML_DO_NOT_TRACK": "True"}
        proc = subprocess.Popen([MODELLOOP, "serve", "--port", str(free_port()), "--host", "127.0.0.1",
                                 "--workers", "1", "--grpc-port", str(port)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:  # it served without its gRPC port
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 1, text
    assert f"MODELLOOP_SERVING_GRPC_PORT: cannot listen on 127.0.0.1:{port}" in text.splitlines()[-1], text


def test_an_unexpected_failure_answers_internal_with_the_id_its_log_line_names(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As over REST: a bug in a call (here one that raises) is logged with its traceback under an
    error id, counted, and answered INTERNAL with a message naming that id (a real gRPC server
    in this process)."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from serving.oip_grpc import InferenceServicer
    from serving.proto import predict_v2_pb2 as spb
    from serving.proto import predict_v2_pb2_grpc as spb_grpc
    from serving.settings import ServingSettings
    from serving.state import ServingState

    metrics = CollectorRegistry()
    state = ServingState(ServingSettings(home=tmp_path), metrics)
    state.jobs.close()

    class Broken(InferenceServicer):
        async def ServerMetadata(self, request: Any, context: Any) -> Any:
            async def call(request: Any, context: Any) -> Any:
                raise RuntimeError("a bug")
            return await self._guarded(request, context, call, auth=False)

    async def main() -> grpc.aio.AioRpcError:
        server = grpc.aio.server()
        spb_grpc.add_GRPCInferenceServiceServicer_to_server(Broken(state), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await spb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(spb.ServerMetadataRequest())
                return info.value
        finally:
            await server.stop(0)

    with caplog.at_level("ERROR", logger="serving.oip_grpc"):
        error = asyncio.run(main())
    assert error.code() is grpc.StatusCode.INTERNAL
    error_id = error.details().removeprefix("internal error ").partition(":")[0]
    assert error.details() == f"internal error {error_id}: the server's log has its traceback"
    (record,) = [r for r in caplog.records if error_id in r.getMessage()]
    assert record.getMessage() == f"error {error_id}: gRPC ServerMetadataRequest failed"
    assert record.exc_info is not None and "a bug" in str(record.exc_info[1])
    assert metrics.get_sample_value("modelloop_serving_errors_total", {"model": "", "reason": "internal"}) == 1.0
