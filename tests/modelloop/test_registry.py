from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from modelloop.registry import ModelNotFound, Registry, RegistryError
from modelloop.schemas import ModelMetadata, Task, TensorSpec


def _meta(name: str = "m") -> ModelMetadata:
    return ModelMetadata(
        name=name,
        task=Task.classification,
        inputs=[TensorSpec(name="input", shape=[None, 2])],
        outputs=[TensorSpec(name="probabilities", shape=[None, 2])],
        feature_names=["a", "b"],
        class_labels=["no", "yes"],
        metrics={"accuracy": 0.9},
    )


def test_register_assigns_increasing_versions_and_keeps_files(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    ref = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]})
    m1 = reg.register(_meta(), b"onnx-1", reference=ref, artifacts={"cm.png": b"png"})
    m2 = reg.register(_meta(), b"onnx-2")
    assert (m1.version, m2.version) == (1, 2)
    v1 = reg.get("m", 1)
    assert v1.onnx_path.read_bytes() == b"onnx-1"
    assert (v1.path / "cm.png").read_bytes() == b"png"
    pd.testing.assert_frame_equal(v1.reference(), ref)
    assert [m.version for m in reg.versions("m")] == [1, 2]
    assert reg.models() == ["m"]


def test_promote_and_rollback_move_aliases(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    for _ in range(3):
        reg.register(_meta(), b"x")
    assert reg.promote("m", 1) == {"production": 1}
    assert reg.promote("m", "2") == {"production": 2, "previous": 1}
    assert reg.get("m").version == 2
    assert reg.rollback("m") == {"production": 1, "previous": 2}
    assert reg.get("m", "previous").version == 2
    assert [h["op"] for h in reg.history("m")] == ["promote", "promote", "rollback"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        # unknown model
        (lambda r: r.get("nope"), "model 'nope' is not registered"),
        # unknown version
        (lambda r: r.get("m", 9), "model 'm' has no version 9"),
        # alias never set
        (lambda r: r.get("m", "staging"), "model 'm' has no alias 'staging'"),
        # rollback with nothing to roll back to
        (lambda r: r.rollback("m"), "has no previous version to roll back to"),
        # path traversal in a name
        (lambda r: r.get("../etc"), "invalid model name '../etc'"),
        # promote a version that does not exist
        (lambda r: r.promote("m", 5), "model 'm' has no version 5"),
    ],
)
def test_errors_name_the_problem(tmp_path: Path, call, message: str) -> None:
    reg = Registry(tmp_path)
    reg.register(_meta(), b"x")
    with pytest.raises(RegistryError, match=message.replace("(", r"\(")):
        call(reg)


def test_model_not_found_is_a_registry_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        Registry(tmp_path).get("m")


def _register_many(root: str, n: int) -> list[int]:
    reg = Registry(root)
    return [reg.register(_meta(), b"x" * 1000).version for _ in range(n)]


def test_two_writers_never_share_a_version(tmp_path: Path) -> None:
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(_register_many, [str(tmp_path)] * 2, [15, 15]))
    versions = sorted(results[0] + results[1])
    assert versions == list(range(1, 31))


_WRITER = textwrap.dedent(
    """
    import sys
    from modelloop.registry import Registry
    from modelloop.schemas import ModelMetadata, Task, TensorSpec
    reg = Registry(sys.argv[1])
    meta = ModelMetadata(name="m", task=Task.classification,
        inputs=[TensorSpec(name="input", shape=[None, 2])],
        outputs=[TensorSpec(name="probabilities", shape=[None, 2])], feature_names=["a", "b"])
    payload = b"o" * 4_000_000
    print("ready", flush=True)
    while True:
        v = reg.register(meta, payload).version
        reg.promote("m", v)
    """
)


def test_registry_consistent_after_writer_killed_mid_write(tmp_path: Path) -> None:
    """SIGKILL a writer at many points in its loop; every state left behind must be whole."""
    reg = Registry(tmp_path)
    for i in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.037 * i)  # kill at a different point of the write each time
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        aliases = json.loads((tmp_path / "m" / "aliases.json").read_text()) if (
            tmp_path / "m" / "aliases.json").exists() else {}
        for version in [m.version for m in reg.versions("m")]:
            mv = reg.get("m", version)
            assert mv.onnx_path.stat().st_size == 4_000_000, f"v{version} is partial"
        for alias, v in aliases.items():
            assert reg.get("m", alias).version == v
    # a new writer cleans leftovers and carries on from the last whole version
    before = len(reg.versions("m"))
    assert before > 0
    meta = reg.register(_meta(), b"y")
    assert meta.version == before + 1
    assert not list((tmp_path / "m" / "versions").glob(".tmp-*"))
