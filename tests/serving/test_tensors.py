"""Image and sequence inputs at the boundary: `/predict` instances and Open Inference Protocol
tensors checked against the model's input shape, errors naming the value's place as it was sent,
and sequences of different lengths batched apart on a real ONNX Runtime session."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelloop.registry import Registry
from modelloop.schemas import ModelMetadata, Task, TensorSpec, monitored_features
from serving.batcher import AdaptiveBatcher
from serving.oip import decode_infer
from serving.runtime import OnnxRuntime
from serving.validation import RequestError, parse_instances

PIXELS = [f"px{i}" for i in range(16)]
IMAGE = ModelMetadata(name="img", version=1, task=Task.classification,
                      inputs=[TensorSpec(name="input", shape=[None, 1, 4, 4])],
                      outputs=[TensorSpec(name="probabilities", shape=[None, 2])],
                      feature_names=PIXELS, class_labels=["a", "b"])
SEQUENCE = ModelMetadata(name="seq", version=1, task=Task.classification,
                         inputs=[TensorSpec(name="input", shape=[None, None, 3])],
                         outputs=[TensorSpec(name="probabilities", shape=[None, 2])],
                         feature_names=["c0", "c1", "c2"], class_labels=["a", "b"])


def image(value: float = 0.0) -> list[list[list[float]]]:
    return [[[value] * 4 for _ in range(4)]]


def parse(meta: ModelMetadata, instances: list[Any]) -> np.ndarray:
    return parse_instances({"instances": instances}, meta, nan_policy="allow", max_rows=100)


@pytest.mark.parametrize(
    ("meta", "instances", "shape"),
    [
        # nested images
        (IMAGE, [image(), image(1.0)], (2, 1, 4, 4)),
        # images as flat rows of their pixels, a null pixel among them
        (IMAGE, [[0.0] * 15 + [None], [1.0] * 16], (2, 1, 4, 4)),
        # an image as a record of its pixels
        (IMAGE, [dict.fromkeys(PIXELS, 0.5)], (1, 1, 4, 4)),
        # sequences of 5 steps
        (SEQUENCE, [[[0.0, 1.0, 2.0]] * 5, [[1.0, 1.0, 1.0]] * 5], (2, 5, 3)),
        # a sequence of one step
        (SEQUENCE, [[[0.0, 1.0, 2.0]]], (1, 1, 3)),
    ],
)
def test_tensor_instances_take_the_models_shape(meta: ModelMetadata, instances: list[Any],
                                                shape: tuple[int, ...]) -> None:
    x = parse(meta, instances)
    assert x.shape == shape and x.dtype == np.float32


def _bad(at: tuple[int, ...], value: Any, base: list[Any]) -> list[Any]:
    out = json.loads(json.dumps(base))
    node = out
    for k in at[:-1]:
        node = node[k]
    node[at[-1]] = value
    return out


@pytest.mark.parametrize(
    ("meta", "instances", "field", "message"),
    [
        # a string pixel in row 3 of the second image: named where it was sent
        (IMAGE, _bad((1, 0, 3, 2), "x", [image(), image()]), "instances[1][0][3][2]",
         "expected a number, got string"),
        # a bad pixel of a flat row
        (IMAGE, _bad((1, 10), True, [[0.0] * 16, [0.0] * 16]), "instances[1][10]",
         "expected a number, got boolean"),
        # a bad pixel of a record
        (IMAGE, [dict.fromkeys(PIXELS, 0.0), {**dict.fromkeys(PIXELS, 0.0), "px5": "x"}],
         "instances[1].px5", "expected a number, got string"),
        # a flat row one pixel short
        (IMAGE, [[0.0] * 15], "instances[0]", "expected 16 values, got 15"),
        # an image row one pixel short
        (IMAGE, [[[[0.0] * 4, [0.0] * 4, [0.0] * 3, [0.0] * 4]]], "instances[0][0][2]",
         "expected 4 values, got 3"),
        # a step of a sequence with an infinite value
        (SEQUENCE, _bad((0, 3, 1), 1e999, [[[0.0] * 3] * 5]), "instances[0][3][1]",
         "is not a finite float32 number"),
        # sequences of two lengths in one request
        (SEQUENCE, [[[0.0] * 3] * 5, [[0.0] * 3] * 6], "instances[1]",
         "shape [6, 3] differs from instances[0]'s [5, 3]"),
        # a sequence with no steps
        (SEQUENCE, [[]], "instances[0]", "expected at least 1 values, got 0"),
    ],
)
def test_bad_tensor_instances_name_the_value(meta: ModelMetadata, instances: list[Any], field: str,
                                             message: str) -> None:
    with pytest.raises(RequestError) as err:
        parse(meta, instances)
    assert err.value.status == 422
    assert err.value.field == field and message in err.value.message, err.value


def infer_body(shape: list[int], data: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": shape,
                                   "data": data}]}).encode()


def test_oip_image_rows_are_reshaped_to_images() -> None:
    req = decode_infer(infer_body([2, 16], [0.5] * 32), None, IMAGE, nan_policy="allow", max_rows=10)
    assert req.x.shape == (2, 1, 4, 4)  # batched together with requests sent as images


@pytest.mark.parametrize(
    ("meta", "shape", "data", "status", "field", "message"),
    [
        # nested data with a bad value: its place in the nested data (a value error: 422)
        (IMAGE, [2, 1, 4, 4], _bad((1, 0, 2, 3), "x", [image(), image()]), 422,
         "inputs[0].data[1][0][2][3]", "expected a number"),
        # flat data with a bad value: its index in the flat data
        (SEQUENCE, [2, 3, 3], [0.0] * 16 + ["x"] + [0.0], 422, "inputs[0].data[16]",
         "expected a number"),
        # nested data of the wrong shape: 400 like every OIP shape error
        (SEQUENCE, [1, 2, 3], [[[0.0] * 3, [0.0] * 2]], 400, "inputs[0].data[0][1]",
         "expected 3 values"),
        # a shape whose size wraps around in int64, with no data
        (SEQUENCE, [64, 2**58, 3], [], 400, "inputs[0].data", "0 values do not fill shape"),
        # the model's third axis is 3
        (SEQUENCE, [1, 2, 4], [0.0] * 8, 400, "inputs[0].shape", "expected [rows, steps, 3]"),
    ],
)
def test_bad_oip_tensors(meta: ModelMetadata, shape: list[int], data: Any, status: int,
                         field: str, message: str) -> None:
    with pytest.raises(RequestError) as err:
        decode_infer(infer_body(shape, data), None, meta, nan_policy="allow", max_rows=100)
    assert (err.value.status, err.value.field) == (status, field)
    assert message in err.value.message, err.value


_DEEP = b"[" * 1000 + b"0.5" + b"]" * 1000
_IMAGE_TENSOR = {"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": [0.5] * 16}


@pytest.mark.parametrize(
    ("meta", "body", "field", "message"),
    [
        # a tensor model's shape check echoes the shape: 1,000 deep, repr recursed (500)
        (SEQUENCE, b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": ' + _DEEP + b', "data": []}]}',
         "inputs[0].shape", "expected [rows, steps, 3], got [[[["),
        # a value 1,000 deep in nested image data
        (IMAGE, b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": [[[['
         + _DEEP + b"," + b"0.5," * 2 + b"0.5]" + b",[0.5,0.5,0.5,0.5]" * 3 + b"]]]}]}",
         "inputs[0].data[0][0][0][0]", "got array [[[["),
        # parameters and datatype of the wrong JSON type (500 before)
        (IMAGE, json.dumps({"inputs": [{**_IMAGE_TENSOR, "parameters": "x"}]}).encode(), "inputs[0].parameters",
         "expected an object of parameters, got string"),
        (IMAGE, json.dumps({"inputs": [{**_IMAGE_TENSOR, "datatype": ["FP32"]}]}).encode(), "inputs[0].datatype",
         'expected a string such as "FP32", got array ["FP32"]'),
        (IMAGE, json.dumps({"inputs": [_IMAGE_TENSOR], "parameters": [1]}).encode(), "parameters",
         "expected an object of parameters, got array [1]"),
        (IMAGE, json.dumps({"inputs": [_IMAGE_TENSOR], "outputs": [{"name": "probabilities", "parameters": 5}]}).encode(),
         "outputs[0].parameters", "got int 5"),
    ],
    ids=["deep shape", "deep value", "input parameters", "datatype", "parameters", "output parameters"],
)
def test_hostile_oip_bodies_get_4xx_naming_the_field(meta: ModelMetadata, body: bytes, field: str,
                                                     message: str) -> None:
    with pytest.raises(RequestError) as err:
        decode_infer(body, None, meta, nan_policy="allow", max_rows=100)
    assert (err.value.status, err.value.field) == (422 if "data[" in field else 400, field)
    assert message in err.value.message, err.value


def test_monitoring_sees_pixels_and_mean_steps() -> None:
    images = np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4)
    assert monitored_features(images, IMAGE.input_dims).shape == (2, 16)
    seq = np.array([[[1.0, np.nan, 3.0], [3.0, np.nan, 5.0]]], np.float32)
    np.testing.assert_array_equal(monitored_features(seq, SEQUENCE.input_dims),
                                  [[2.0, np.nan, 4.0]])


@pytest.fixture(scope="module")
def sequence_runtime(tmp_path_factory: pytest.TempPathFactory) -> OnnxRuntime:
    """A real ONNX graph over sequences of any length: the mean over time, a linear layer, softmax."""
    weights = np.array([[1.0, -1.0], [0.5, 0.5], [-1.0, 1.0]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input", "axes"], ["mean"], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "seq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "steps", 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array([1]), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    registry = Registry(tmp_path_factory.mktemp("reg"))
    registry.register(SEQUENCE, model.SerializeToString())
    return OnnxRuntime(registry.get("seq", 1), provider="cpu").load()


def test_sequences_of_different_lengths_are_batched_apart(sequence_runtime: OnnxRuntime) -> None:
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(2, n, 3)).astype(np.float32) for n in (5, 7, 5, 1)]
    calls: list[tuple[int, ...]] = []

    async def main() -> list[np.ndarray]:
        batcher = AdaptiveBatcher(max_batch_rows=64, observer=lambda rt, rows, s, w: calls.append(rows))
        await batcher.start()
        try:  # sent together: they queue up while the first runs
            results = await asyncio.gather(*(batcher.predict(sequence_runtime, x) for x in xs))
        finally:
            await batcher.stop()
        return [r.outputs["probabilities"] for r in results]

    outputs = asyncio.run(main())
    weights = np.array([[1.0, -1.0], [0.5, 0.5], [-1.0, 1.0]], np.float32)
    for x, out in zip(xs, outputs, strict=True):
        logits = x.mean(axis=1) @ weights
        expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert sum(calls) == 8 and len(calls) >= 3  # never two lengths in one call
    assert sequence_runtime.work_rows(xs[1]) == pytest.approx(2 * 7 / 16)
