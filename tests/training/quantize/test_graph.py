"""The graph before quantization: each Gemm rewritten as MatMul (+ Add) with the same outputs,
and dataset rows laid out as the model's input."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from training.export import onnx_session
from training.measure import layout
from training.quantize import gemm_to_matmul

pytestmark = pytest.mark.slow


# -- the graph rewrite -------------------------------------------------------------------------
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_to_matmul_gives_the_same_outputs(trans_b: int, bias: bool) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 5) if trans_b else (5, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "b"))
        inputs.append("b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", inputs, ["y"], transB=trans_b)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    rewritten = gemm_to_matmul(model)
    assert [n.op_type for n in rewritten.graph.node] == (["MatMul", "Add"] if bias else ["MatMul"])
    assert [n.op_type for n in model.graph.node] == ["Gemm"]  # the input is left alone
    x = rng.normal(size=(4, 5)).astype(np.float32)
    before = onnx_session(model.SerializeToString()).run(None, {"x": x})[0]
    after = onnx_session(rewritten.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "rows", "expected"),
    [
        ([None, 64], (5, 64), (5, 64)),          # tabular rows as they are
        ([None, 1, 8, 8], (5, 64), (5, 1, 8, 8)),  # an image's pixels reshaped
        ([None, None, 3], (5, 24, 3), (5, 24, 3)),  # a sequence of any length as it is
    ],
)
def test_layout(shape: list[int | None], rows: tuple[int, ...], expected: tuple[int, ...]) -> None:
    out = layout(np.zeros(rows, np.float64), shape)
    assert out.shape == expected and out.dtype == np.float32 and out.flags.c_contiguous
