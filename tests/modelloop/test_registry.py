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

from modelloop.registry import BrokenVersion, ModelNotFound, Registry, RegistryError
from modelloop.schemas import ModelMetadata, Task, TensorSpec
from tests.modelloop.onnx_graphs import tiny


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
    for seed in range(3):
        tiny(seed=seed).register(reg)
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
    from pathlib import Path
    import pandas as pd
    from modelloop.registry import Registry
    from modelloop.schemas import ModelMetadata
    from modelloop.verify import check_version
    reg = Registry(sys.argv[1])
    model = Path(sys.argv[2])
    meta = ModelMetadata.model_validate_json((model / "metadata.json").read_text())
    onnx, reference = (model / "model.onnx").read_bytes(), pd.read_parquet(model / "reference.parquet")
    payload = b"o" * 4_000_000
    check_version(reg.get("m", 1))  # ONNX Runtime imported before the kills begin
    print("ready", flush=True)
    while True:
        v = reg.register(meta, onnx, reference, artifacts={"payload.bin": payload}).version
        reg.promote("m", v)
    """
)


def test_registry_consistent_after_writer_killed_mid_write(tmp_path: Path) -> None:
    """SIGKILL a writer at many points in its loop; every state left behind must be whole."""
    reg = Registry(tmp_path)
    first = tiny().register(reg)  # a real model: every promotion runs its check
    model = reg.get("m", first.version).path
    for i in range(8):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), str(model)], stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.037 * i)  # kill at a different point of the write each time
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        aliases = json.loads((tmp_path / "m" / "aliases.json").read_text()) if (
            tmp_path / "m" / "aliases.json").exists() else {}
        for version in [m.version for m in reg.versions("m")][1:]:
            mv = reg.get("m", version)
            assert (mv.path / "payload.bin").stat().st_size == 4_000_000, f"v{version} is partial"
            assert mv.onnx_path.read_bytes() == (model / "model.onnx").read_bytes()
        for alias, v in aliases.items():
            assert reg.get("m", alias).version == v
    # a new writer cleans leftovers and carries on from the last whole version
    before = len(reg.versions("m"))
    assert before > 1
    meta = reg.register(_meta(), b"y")
    assert meta.version == before + 1
    assert not list((tmp_path / "m" / "versions").glob(".tmp-*"))


# -- no alias moves to a broken version ------------------------------------------------------
def _hand_written(reg: Registry, aliases: dict[str, int]) -> None:
    """Aliases written behind the registry's back (as someone editing aliases.json would)."""
    (reg.root / "m" / "aliases.json").write_text(json.dumps(aliases))


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    """v1 and v2 pass their checks; v3 outputs NaN (a scale of zero); v4 is not ONNX."""
    reg = Registry(tmp_path)
    tiny(seed=0).register(reg)
    tiny(seed=1).register(reg)
    tiny(seed=0, scale=0.0).register(reg)
    reg.register(_meta().model_copy(update={"feature_names": ["a", "b", "c"]}), b"not onnx",
                 reference=tiny().reference)
    return reg


NAN = "output 'probabilities' is not finite (NaN or infinity) in 64 of 64 reference rows, first row 0"


def test_no_alias_moves_to_a_version_that_fails_its_check(reg: Registry) -> None:
    reg.promote("m", 1)
    before = (reg.aliases("m"), reg.history("m"))
    with pytest.raises(BrokenVersion) as caught:
        reg.promote("m", 3)
    assert str(caught.value) == f"m v3 is broken: {reg.get('m', 3).onnx_path}: {NAN}"
    assert (reg.aliases("m"), reg.history("m")) == before


def test_a_file_onnx_runtime_cannot_load_is_never_promoted(reg: Registry) -> None:
    with pytest.raises(BrokenVersion, match="ONNX Runtime cannot load it"):
        reg.promote("m", 4)
    assert reg.aliases("m") == {}


def test_a_broken_production_does_not_become_previous(reg: Registry) -> None:
    reg.promote("m", 1)
    _hand_written(reg, {"production": 3, "previous": 1})
    assert reg.promote("m", 2) == {"production": 2, "previous": 1}  # previous stays as it was
    assert NAN in reg.history("m")[-1]["not_previous"]


def test_rollback_to_a_broken_version_is_refused(reg: Registry) -> None:
    _hand_written(reg, {"production": 1, "previous": 3})
    with pytest.raises(BrokenVersion, match=r"m v3 is broken: .*not finite"):
        reg.rollback("m")
    assert reg.aliases("m") == {"production": 1, "previous": 3}


def test_rollback_from_a_broken_version_leaves_no_previous(reg: Registry) -> None:
    _hand_written(reg, {"production": 3, "previous": 1})
    assert reg.rollback("m") == {"production": 1}
    with pytest.raises(RegistryError, match="has no previous version to roll back to"):
        reg.rollback("m")


# -- unreadable files name themselves ----------------------------------------------------------
@pytest.mark.parametrize(("content", "reason"), [
    # cut short
    (b'{"name": "m", "vers', "not valid metadata: Invalid JSON: EOF while parsing a string at line 1 column 19"),
    # valid JSON, not metadata
    (b'{"name": "m", "version": 2}', "not valid metadata: task: Field required; inputs: Field "
     "required; outputs: Field required (and 1 more)"),
    # another version's metadata copied in
    (tiny().metadata.model_copy(update={"version": 1}).model_dump_json().encode(),
     "it describes m v1"),
])
def test_unreadable_metadata_is_one_line_naming_the_file(tmp_path: Path, content: bytes,
                                                         reason: str) -> None:
    reg = Registry(tmp_path)
    tiny().register(reg)
    tiny().register(reg)
    file = tmp_path / "m" / "versions" / "2" / "metadata.json"
    file.write_bytes(content)
    with pytest.raises(BrokenVersion) as caught:
        reg.get("m", 2)
    assert str(caught.value) == f"m v2 is broken: {file}: {reason}"
    assert reg.version_numbers("m") == [1, 2] and reg.get("m", 1).version == 1
    with pytest.raises(BrokenVersion):  # and it is never promoted
        reg.promote("m", 2)


def test_unreadable_aliases_name_the_file(tmp_path: Path) -> None:
    reg = Registry(tmp_path)
    tiny().register(reg)
    (tmp_path / "m" / "aliases.json").write_text("[1, 2]")
    with pytest.raises(RegistryError, match=r"aliases.json is not a valid alias mapping"):
        reg.get("m")



def test_a_canary_alias_is_checked_as_a_promotion_is(reg: Registry) -> None:
    reg.promote("m", 1)
    assert reg.set_alias("m", "canary", 2) == {"production": 1, "canary": 2}
    before = (reg.aliases("m"), reg.history("m"))
    with pytest.raises(BrokenVersion, match=NAN.replace("(", r"\(").replace(")", r"\)")):
        reg.set_alias("m", "canary", 3)
    assert (reg.aliases("m"), reg.history("m")) == before
    with pytest.raises(RegistryError, match="use promote or rollback"):
        reg.set_alias("m", "production", 2)
    assert reg.remove_alias("m", "canary") == {"production": 1}
    assert [h["op"] for h in reg.history("m")] == ["promote", "set_alias", "remove_alias"]


@pytest.mark.parametrize(("share", "error"), [
    (0.2, None),
    (0.0, None),
    (1.5, "canary share 1.5 is not between 0 and 1"),  # more than every request
    (-0.1, "canary share -0.1 is not between 0 and 1"),
])
def test_the_canary_share_is_kept_beside_the_aliases(reg: Registry, share: float, error: str | None) -> None:
    assert reg.canary_share("m") == 0.0  # never set
    if error is None:
        reg.set_canary_share("m", share)
        assert reg.canary_share("m") == share
        assert reg.history("m")[-1] == {**reg.history("m")[-1], "op": "canary_share", "share": share}
    else:
        with pytest.raises(RegistryError, match=f"^{error}$"):
            reg.set_canary_share("m", share)
