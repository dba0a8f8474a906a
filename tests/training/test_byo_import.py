"""`modelloop models import`: a scikit-learn pipeline converted by skl2onnx from a DataFrame (one
`[None, 1]` input per column, ZipMap probabilities, its classes in the graph) imported, served by
a real `modelloop serve` (/predict, the Open Inference Protocol, batch scoring) with its events
reaching a real sidecar; a challenger imported beside it; and every refusal, one line, exit 2."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families
from skl2onnx import to_onnx
from sklearn.datasets import make_classification
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from modelloop.registry import Registry
from modelloop.schemas import INPUT_NAME, PROBABILITIES, REF_LABEL, REF_PREDICTION, REF_PROBA_PREFIX
from tests.monitoring.helpers import ServingProcess, SidecarProcess

MODELLOOP = str(Path(sys.executable).with_name("modelloop"))
COLUMNS = ["tenure", "charges", "calls", "logins", "age"]
CLASSES = ["churn", "stay"]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def churn(rows: int = 900, seed: int = 0) -> pd.DataFrame:
    x, y = make_classification(rows, len(COLUMNS), n_informative=3, random_state=seed)
    frame = pd.DataFrame(x.astype(np.float32), columns=COLUMNS)
    frame["label"] = np.array(CLASSES)[y]
    return frame


def sklearn_file(path: Path, pipe: Pipeline, frame: pd.DataFrame) -> Path:
    """``pipe`` fitted on ``frame`` and converted as skl2onnx converts from a DataFrame: one
    input per column, the label and a ZipMap of probabilities out."""
    pipe.fit(frame[COLUMNS], frame["label"])
    path.write_bytes(to_onnx(pipe, frame[COLUMNS][:1], target_opset=17).SerializeToString())
    return path


def import_cli(home: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MODELLOOP, "models", "import", *map(str, args)],
                          env={**os.environ, "MODELLOOP_HOME": str(home)},
                          capture_output=True, text=True, timeout=300)


def ingested(sidecar: SidecarProcess, model: str) -> float:
    text = httpx.get(f"{sidecar.url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "modelloop_events_ingested_total" and s.labels.get("model") == model)


def test_a_sklearn_pipeline_is_imported_served_and_monitored(tmp_path: Path) -> None:
    import tritonclient.http as triton

    frame = churn()
    train, held = frame[:600], frame[600:]
    train[["label", *reversed(COLUMNS)]].to_csv(tmp_path / "train.csv", index=False)  # any order
    held.to_csv(tmp_path / "held.csv", index=False)
    pipe = make_pipeline(StandardScaler(), GradientBoostingClassifier(n_estimators=40, random_state=0))
    onnx_file = sklearn_file(tmp_path / "churn.onnx", pipe, train)
    home = tmp_path / "home"

    done = import_cli(home, onnx_file, "--reference", tmp_path / "train.csv", "--holdout",
                      tmp_path / "held.csv", "--target", "label", "--name", "churn", "--promote",
                      "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["version"], summary["task"], summary["promoted"]) == (1, "classification", True)
    assert summary["metrics"]["accuracy"] > 0.8
    meta = Registry(home / "registry").get("churn").metadata
    assert meta.class_labels == CLASSES and meta.feature_names == COLUMNS  # the graph's, in its order
    assert meta.lineage["graph_inputs"] == COLUMNS
    stored = onnx.load(str(Registry(home / "registry").get("churn").onnx_path))
    assert [i.name for i in stored.graph.input] == [INPUT_NAME]
    assert [o.name for o in stored.graph.output] == [PROBABILITIES]

    x = held[COLUMNS].to_numpy(np.float32)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    _, zipmap = session.run(None, {c: x[:, [i]] for i, c in enumerate(COLUMNS)})
    expected = np.array([[row[c] for c in CLASSES] for row in zipmap], np.float32)
    np.testing.assert_allclose(expected, pipe.predict_proba(held[COLUMNS]), atol=1e-5)

    sidecar = SidecarProcess(home, tmp_path / "sidecar.log").start()
    server = ServingProcess(home, tmp_path / "serve.log", sidecar.url, model="churn")
    try:
        server.start()
        # /predict: records by column name, in any order
        records = held[list(reversed(COLUMNS))].to_dict("records")
        resp = server.client.post("/predict", json={"instances": records})
        assert resp.status_code == 200, resp.text
        preds = resp.json()["predictions"]
        got = np.array([[p["probabilities"][c] for c in CLASSES] for p in preds], np.float32)
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert [p["label"] for p in preds] == list(pipe.predict(held[COLUMNS]))

        # the Open Inference Protocol, binary tensors through tritonclient
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        tensor = triton.InferInput(INPUT_NAME, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=True)
        result = client.infer("churn", [tensor])
        np.testing.assert_allclose(result.as_numpy(PROBABILITIES), expected, atol=1e-6)
        client.close()

        # batch scoring of a CSV file
        buf = io.BytesIO()
        held[COLUMNS].to_csv(buf, index=False)
        resp = server.client.post("/batch/score", content=buf.getvalue(),
                                  headers={"Content-Type": "text/csv"})
        assert resp.status_code == 200, resp.text
        scored = pd.read_csv(io.BytesIO(resp.content))
        assert len(scored) == len(held)

        # each served row is an event at the sidecar, judged against the imported reference
        deadline = time.monotonic() + 30
        while ingested(sidecar, "churn") < 2 * len(held) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ingested(sidecar, "churn") >= 2 * len(held)
        check = httpx.post(f"{sidecar.url}/check", params={"model": "churn"}, timeout=60)
        assert check.status_code == 200, check.text
    finally:
        server.close()
        sidecar.close()

    # the user's pipeline imports its next model as the challenger; production stays
    worse = make_pipeline(StandardScaler(), LogisticRegression(C=1e-4))
    next_file = sklearn_file(tmp_path / "next.onnx", worse, churn(seed=1)[:300])
    done = import_cli(home, next_file, "--reference", tmp_path / "train.csv", "--target", "label",
                      "--name", "churn", "--challenger")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "registered churn v2 from next.onnx (challenger)"
    assert Registry(home / "registry").aliases("churn") == {"production": 1, "challenger": 2}


def column_graph(path: Path, *, batch: str | int = "N", poison: bool = False,
                 dtype: int = TensorProto.FLOAT) -> Path:
    """A hand-made graph with one ``[batch, 1]`` input per column: concatenated, a linear map
    and a softmax; ``poison`` takes the log of a negative number first (NaN on every row)."""
    weights = numpy_helper.from_array(np.ones((len(COLUMNS), 2), np.float32), "w")
    nodes = [helper.make_node("Concat", COLUMNS, ["x"], axis=1)]
    if poison:
        nodes += [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["n"]),
                  helper.make_node("Log", ["n"], ["l"])]
    nodes += [helper.make_node("MatMul", ["l" if poison else "x", "w"], ["z"]),
              helper.make_node("Softmax", ["z"], ["p"], axis=1)]
    graph = helper.make_graph(
        nodes, "columns", [helper.make_tensor_value_info(c, dtype, [batch, 1]) for c in COLUMNS],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [batch, 2])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path.write_bytes(model.SerializeToString())
    return path


def good_file(path: Path) -> Path:
    return sklearn_file(path, make_pipeline(StandardScaler(), LogisticRegression()), churn()[:300])


def garbage(path: Path) -> Path:
    path.write_bytes(b"\x08\x07 not a graph")
    return path


@pytest.mark.parametrize(
    ("make", "reference", "flags", "message"),
    [
        # not an ONNX graph at all
        (garbage, COLUMNS, [], "ONNX file model.onnx is not a valid ONNX model: DecodeError"),
        # NaN on every row
        (lambda p: column_graph(p, poison=True), COLUMNS, [],
         "ONNX file model.onnx gives NaN or infinity in"),
        # the reference lacks a column the graph takes, and has one it does not
        (good_file, [*COLUMNS[:-1], "zip"], [],
         "ref.csv: its columns do not match the graph's inputs: no column for the graph's inputs "
         "['age']; columns ['zip'] that are not inputs of the graph (target column 'label')"),
        # the batch axis fixed at 1
        (lambda p: column_graph(p, batch=1), COLUMNS, [],
         "ONNX file model.onnx: input 'tenure' has shape [1, 1]: its batch axis is not dynamic"),
        # a column of strings is not served
        (lambda p: column_graph(p, dtype=TensorProto.STRING), COLUMNS, [],
         "ONNX file model.onnx takes 5 inputs and 'tenure' is not a numeric column [batch, 1] "
         "(STRING ['N', 1])"),
        # the classes in another order than the graph's
        (good_file, COLUMNS, ["--classes", "stay,churn"],
         "ONNX file model.onnx: its classes are ['churn', 'stay'], in this order; the classes "
         "given are ['stay', 'churn']"),
        # a classifier imported as a regressor
        (good_file, COLUMNS, ["--task", "regression"],
         "ONNX file model.onnx is a classification model (its ai.onnx.ml nodes say so), not "
         "regression"),
    ],
    ids=["does not load", "NaN", "columns", "static batch", "string column", "classes", "task"],
)
def test_refusals(tmp_path: Path, make: Callable[[Path], Path], reference: list[str],
                  flags: list[str], message: str) -> None:
    path = make(tmp_path / "model.onnx")
    frame = churn(300)
    frame.columns = [*reference, "label"]
    frame.to_csv(tmp_path / "ref.csv", index=False)
    done = import_cli(tmp_path / "home", path, "--reference", tmp_path / "ref.csv", "--target",
                      "label", "--name", "churn", *flags)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ")
    assert message in done.stderr.replace(str(tmp_path / "ref.csv"), "ref.csv"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert Registry(tmp_path / "home" / "registry").models() == []


def test_a_reference_without_labels(tmp_path: Path) -> None:
    """No target column: the classes come from the graph, there are no metrics, and the
    reference sample holds the features and the graph's predictions."""
    frame = churn(300)
    frame[COLUMNS].to_csv(tmp_path / "unlabelled.csv", index=False)
    home = tmp_path / "home"
    done = import_cli(home, good_file(tmp_path / "model.onnx"), "--reference",
                      tmp_path / "unlabelled.csv", "--name", "churn", "--promote")
    assert done.returncode == 0, done.stderr
    version = Registry(home / "registry").get("churn")
    assert version.metadata.class_labels == CLASSES and version.metadata.metrics == {}
    reference = version.reference()
    assert REF_LABEL not in reference and len(reference) == len(frame)
    assert set(reference.columns) >= {*COLUMNS, REF_PREDICTION, f"{REF_PROBA_PREFIX}1"}

    # a graph that does not say its task needs the flags
    done = import_cli(home, column_graph(tmp_path / "plain.onnx"), "--reference",
                      tmp_path / "unlabelled.csv", "--name", "plain")
    assert done.returncode == 2
    assert done.stderr == (f"error: {tmp_path / 'unlabelled.csv'}: without a target column the "
                           "task must be given (--task, --classes) or said by the graph\n")
