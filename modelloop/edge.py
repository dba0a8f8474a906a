"""Edge bundles: a registered version as a folder that runs with ONNX Runtime and NumPy alone.

:func:`export_bundle` writes, into an empty folder:

* the graph: ``model.onnx`` as registered, or (``ort``) ``model.ort``, converted by ONNX
  Runtime's ``convert_onnx_models_to_ort`` (optimizations applied at conversion, ``Fixed``
  style), with ``model.required_operators.config``, the reduced operator list a minimal ONNX
  Runtime build takes (``build.sh --minimal_build --include_ops_by_config ...``);
* ``schema.json``: name, version, task, feature names, the input and output tensor specs, class
  labels, and which file is the graph;
* ``reference_stats.json``: each feature's mean, std, min, max and missing share over the
  training rows of the version's reference sample (what drift is measured against);
* ``predict.py`` (:mod:`modelloop.edge_predict`), its :class:`Predictor` answering as
  ``/predict``, and ``requirements.txt`` (``numpy``, ``onnxruntime``)::

    bundle = export_bundle(registry.get("cancer", "production"), Path("edge"), BundleFormat.ort)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from modelloop.registry import ModelVersion, RegistryError
from modelloop.schemas import REF_SPLIT, ModelMetadata, Task

SCHEMA_JSON = "schema.json"
STATS_JSON = "reference_stats.json"
PREDICT_PY = "predict.py"
REQUIREMENTS_TXT = "requirements.txt"
OPERATORS_CONFIG = "model.required_operators.config"
CONVERT_TIMEOUT_S = 300


class BundleFormat(StrEnum):
    onnx = "onnx"
    """The registered ONNX file, as served."""
    ort = "ort"
    """ONNX Runtime's own format, for its minimal builds, with the operators it needs."""


class BundleError(RuntimeError):
    """The bundle could not be written (the folder is not empty, the conversion failed)."""


class ConversionError(BundleError):
    """ONNX Runtime could not convert the graph to ORT format (a failure, not the caller's)."""


@dataclass(frozen=True)
class Bundle:
    root: Path
    files: list[str]


def schema(meta: ModelMetadata, graph: str) -> dict[str, Any]:
    """What a predictor needs to read rows and answer: the version's interface."""
    labels = meta.class_labels_or_indices() if meta.task is Task.classification else None
    return {
        "name": meta.name, "version": meta.version, "task": meta.task.value,
        "architecture": meta.architecture, "graph": graph,
        "feature_names": list(meta.feature_names),
        "inputs": [s.model_dump(mode="json") for s in meta.inputs],
        "outputs": [s.model_dump(mode="json") for s in meta.outputs],
        "class_labels": labels,
    }


def reference_stats(reference: Any, feature_names: list[str]) -> dict[str, Any]:
    """Per feature: mean, std, min, max and the missing share over the reference sample's
    training rows (all its rows when it does not mark them)."""
    rows = reference[reference[REF_SPLIT] == "train"] if REF_SPLIT in reference else reference
    features: dict[str, dict[str, float | None]] = {}
    for name in feature_names:
        column = rows[name].astype("float64")

        def number(value: Any) -> float | None:
            return None if value != value else float(value)  # NaN (an all-missing column)

        features[name] = {"mean": number(column.mean()), "std": number(column.std(ddof=0)),
                          "min": number(column.min()), "max": number(column.max()),
                          "missing": float(column.isna().mean()) if len(column) else 0.0}
    return {"rows": len(rows), "features": features}


def _convert_to_ort(onnx_path: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.onnx"
        shutil.copyfile(onnx_path, model)
        done = subprocess.run(
            [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(model),
             "--output_dir", str(Path(tmp) / "ort"), "--optimization_style", "Fixed"],
            capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
        converted = Path(tmp) / "ort"
        if done.returncode != 0 or not (converted / "model.ort").exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ConversionError(f"ONNX Runtime could not convert the graph to ORT format: "
                                  f"{tail[0]}")
        shutil.copyfile(converted / "model.ort", out / "model.ort")
        config = (converted / OPERATORS_CONFIG).read_text()
        # its comment names the temporary file converted; name the bundle's
        (out / OPERATORS_CONFIG).write_text(config.replace(str(converted / "model.ort"), "model.ort"))


def export_bundle(version: ModelVersion, out: Path, fmt: BundleFormat | str = BundleFormat.onnx) -> Bundle:
    """Write ``version``'s edge bundle into ``out`` (created; it must be empty if it exists)."""
    fmt = BundleFormat(fmt)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out} exists and is not an empty folder; choose a new one")
    out.mkdir(parents=True, exist_ok=True)
    meta = version.metadata
    if fmt is BundleFormat.ort:
        _convert_to_ort(version.onnx_path, out)
        graph = "model.ort"
    else:
        graph = "model.onnx"
        shutil.copyfile(version.onnx_path, out / graph)
    (out / SCHEMA_JSON).write_text(json.dumps(schema(meta, graph), indent=2) + "\n")
    try:
        stats = reference_stats(version.reference(), list(meta.feature_names))
    except RegistryError:  # a version registered without a reference sample
        stats = {"rows": 0, "features": {}}
    (out / STATS_JSON).write_text(json.dumps(stats, indent=2) + "\n")
    shutil.copyfile(Path(__file__).with_name("edge_predict.py"), out / PREDICT_PY)
    (out / REQUIREMENTS_TXT).write_text("numpy\nonnxruntime\n")
    return Bundle(out, sorted(p.name for p in out.iterdir()))
