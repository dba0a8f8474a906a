"""AdaptiveBatcher on a real OnnxRuntime: merging, limits, shedding, errors, swaps."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from modelloop.registry import Registry
from serving.batcher import AdaptiveBatcher, Overloaded
from serving.runtime import CostModel, OnnxRuntime
from tests.serving.onnx_models import register_mlp


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory) -> tuple[OnnxRuntime, OnnxRuntime]:
    reg = Registry(tmp_path_factory.mktemp("reg"))
    register_mlp(reg, "m", n_features=4, n_classes=2, seed=0)
    register_mlp(reg, "m", n_features=4, n_classes=2, seed=1)
    return (OnnxRuntime(reg.get("m", 1), provider="cpu").load(),
            OnnxRuntime(reg.get("m", 2), provider="cpu").load())


class Calls:
    """Records each ONNX Runtime call the batcher makes (rows per call)."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.versions: list[int] = []

    def __call__(self, runtime: OnnxRuntime, rows: int, elapsed: float, waits: list[float]) -> None:
        self.rows.append(rows)
        self.versions.append(runtime.model_version)


def run(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(make())


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


@pytest.mark.parametrize("inline_below_s", [1.0, 0.0], ids=["inline", "on-a-thread"])
def test_concurrent_requests_share_calls_and_get_their_own_rows(
        runtimes: tuple[OnnxRuntime, OnnxRuntime], inline_below_s: float) -> None:
    rt = runtimes[0]
    calls = Calls()
    inputs = [rows(1 + i % 3, seed=i) for i in range(40)]

    async def main() -> list[Any]:
        b = AdaptiveBatcher(max_batch_rows=64, inline_below_s=inline_below_s, observer=calls)
        await b.start()
        results = await asyncio.gather(*(b.predict(rt, x) for x in inputs))
        await b.stop()
        return results

    results = run(main)
    for x, res in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(res.outputs["probabilities"], rt.predict(x)["probabilities"])
        assert res.queue_wait_s >= 0
    assert sum(calls.rows) == sum(len(x) for x in inputs)
    assert len(calls.rows) < len(inputs)  # merged
    assert max(calls.rows) <= 64


@pytest.mark.parametrize(("per_row_s", "small", "large"), [
    (0.00001, "loop", "ort"),  # 1 row: 0.11 ms, below the bound; 50 rows: 0.6 ms, above
    (0.0001, "ort", "ort"),    # heavy: a full batch (64 rows) takes 6.5 ms, past 8 bounds
], ids=["light", "heavy"])
def test_each_batch_is_judged_inline_or_threaded_by_its_own_size_unless_the_model_is_heavy(
        runtimes: tuple[OnnxRuntime, OnnxRuntime], monkeypatch: pytest.MonkeyPatch,
        per_row_s: float, small: str, large: str) -> None:
    """A batch the cost model puts below ``inline_below_s`` runs on the event loop's thread, a
    larger one of the same model on the batcher's ONNX Runtime thread; every batch of a model
    whose full batch is heavy runs on the ONNX Runtime thread."""
    rt = runtimes[0]
    threads: dict[int, str] = {}
    real = rt.predict

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:  # the real call, noting where it ran
        threads[len(x)] = threading.current_thread().name
        return real(x)

    monkeypatch.setattr(rt, "predict", predict)
    monkeypatch.setattr(rt, "cost", CostModel(fixed_s=0.00005, per_row_s=per_row_s))

    async def main() -> str:
        b = AdaptiveBatcher(max_batch_rows=64, inline_below_s=0.0002)
        await b.start()
        await b.predict(rt, rows(1, 0))
        await b.predict(rt, rows(50, 1))
        await b.stop()
        return threading.current_thread().name

    loop_thread = run(main)
    where = {n: "loop" if name == loop_thread else "ort" if name.startswith("ort") else name
             for n, name in threads.items()}
    assert (where[1], where[50]) == (small, large)


def test_max_batch_rows_and_oversized_requests(runtimes: tuple[OnnxRuntime, OnnxRuntime]) -> None:
    calls = Calls()

    async def main() -> None:
        b = AdaptiveBatcher(max_batch_rows=8, observer=calls)
        await b.start()
        await asyncio.gather(*(b.predict(runtimes[0], rows(3, i)) for i in range(10)), b.predict(runtimes[0], rows(20, 99)))
        await b.stop()

    run(main)
    assert 20 in calls.rows  # one request larger than the limit runs alone, never split
    assert all(r <= 8 for r in calls.rows if r != 20)


def test_batching_off_runs_each_request_alone(runtimes: tuple[OnnxRuntime, OnnxRuntime]) -> None:
    calls = Calls()

    async def main() -> None:
        b = AdaptiveBatcher(batching=False, observer=calls)
        await b.start()
        await asyncio.gather(*(b.predict(runtimes[0], rows(2, i)) for i in range(12)))
        await b.stop()

    run(main)
    assert calls.rows == [2] * 12


def test_max_wait_fills_batches(runtimes: tuple[OnnxRuntime, OnnxRuntime]) -> None:
    calls = Calls()

    async def main() -> None:
        b = AdaptiveBatcher(max_batch_rows=10, max_wait_s=0.5, observer=calls)
        await b.start()

        async def late(i: int) -> None:
            await asyncio.sleep(0.01 * i)
            await b.predict(runtimes[0], rows(1, i))

        await asyncio.gather(*(late(i) for i in range(10)))
        await b.stop()

    run(main)
    assert calls.rows == [10]  # waited for the batch to fill instead of running 1-row calls


def test_full_queue_sheds_at_once(runtimes: tuple[OnnxRuntime, OnnxRuntime]) -> None:
    async def main() -> tuple[list[Any], int]:
        b = AdaptiveBatcher(max_batch_rows=4, max_queue_rows=10, inline_below_s=0.0)
        await b.start()
        results = await asyncio.gather(*(b.predict(runtimes[0], rows(4, i)) for i in range(8)),
                                       return_exceptions=True)
        left = b.queued_rows
        await b.stop()
        return results, left

    results, left = run(main)
    shed = [r for r in results if isinstance(r, Overloaded)]
    done = [r for r in results if not isinstance(r, BaseException)]
    assert shed and done and len(shed) + len(done) == 8
    assert all(e.retry_after_s >= 1 for e in shed)
    assert left == 0


def test_a_failing_call_fails_its_requests_only(runtimes: tuple[OnnxRuntime, OnnxRuntime]) -> None:
    async def main() -> tuple[Any, Any]:
        b = AdaptiveBatcher()
        await b.start()
        bad = await asyncio.gather(b.predict(runtimes[0], np.zeros((2, 5), np.float32)), return_exceptions=True)
        good = await b.predict(runtimes[0], rows(2, 0))
        await b.stop()
        return bad[0], good

    bad, good = run(main)
    assert isinstance(bad, Exception) and "input" in str(bad).lower()
    assert good.outputs["probabilities"].shape == (2, 2)


def test_requests_stay_with_the_version_they_were_checked_against(
        runtimes: tuple[OnnxRuntime, OnnxRuntime]) -> None:
    old, new = runtimes
    calls = Calls()

    async def main() -> list[Any]:
        b = AdaptiveBatcher(max_batch_rows=100, observer=calls)
        await b.start()
        jobs = [b.predict(old if i < 5 else new, rows(1, i)) for i in range(10)]
        results = await asyncio.gather(*jobs)
        await b.stop()
        return results

    results = run(main)
    assert [r.runtime.model_version for r in results] == [1] * 5 + [2] * 5
    # each call ran one version: the old requests first, then the new
    assert calls.versions == sorted(calls.versions) and set(calls.versions) == {1, 2}
    for i, r in enumerate(results):
        rt = old if i < 5 else new
        np.testing.assert_array_equal(r.outputs["probabilities"], rt.predict(rows(1, i))["probabilities"])


def test_waiting_for_a_fuller_batch_stops_when_requests_stop_coming(runtimes: tuple[OnnxRuntime, OnnxRuntime]) -> None:
    calls = Calls()

    async def main() -> None:
        b = AdaptiveBatcher(max_batch_rows=100, max_wait_s=8.0, observer=calls)  # quiet gap: 1 s
        await b.start()
        # would take 8 s if the batch waited for max_wait_s instead of the first quiet gap
        await asyncio.wait_for(asyncio.gather(*(b.predict(runtimes[0], rows(1, i)) for i in range(3))), 4)
        await b.stop()

    run(main)
    assert calls.rows == [3]


def test_the_hook_gets_each_batch_with_the_rows_of_the_tagged_requests(
        runtimes: tuple[OnnxRuntime, OnnxRuntime]) -> None:
    rt = runtimes[0]
    recorded: list[tuple[np.ndarray, np.ndarray, list[tuple[object, int]]]] = []
    calls = Calls()
    inputs = [rows(1 + i % 3, seed=i) for i in range(30)]
    tags = [None if i % 4 == 3 else ("req", i) for i in range(30)]  # every fourth carries no tag

    async def main() -> None:
        b = AdaptiveBatcher(max_batch_rows=64, observer=calls,
                            on_tagged=lambda runtime, x, preds, tagged: recorded.append(
                                (x, preds.probabilities, tagged)))
        await b.start()
        await asyncio.gather(*(b.predict(rt, x, tag) for x, tag in zip(inputs, tags, strict=True)))
        await b.stop()

    run(main)
    assert len(recorded) == len(calls.rows) < len(inputs)  # one call per merged batch
    got = {tag: n for _, _, tagged in recorded for tag, n in tagged}
    assert got == {tag: len(x) for x, tag in zip(inputs, tags, strict=True) if tag}  # the tags as given
    for x, proba, tagged in recorded:  # the rows are those of the requests, in their order
        want = np.concatenate([inputs[tag[1]] for tag, _ in tagged])  # type: ignore[index]
        np.testing.assert_array_equal(x, want)
        np.testing.assert_allclose(proba, rt.predict(want)["probabilities"], rtol=1e-6)


def test_a_request_whose_caller_went_away_is_not_handed_on(runtimes: tuple[OnnxRuntime, OnnxRuntime]) -> None:
    rt = runtimes[0]
    recorded: list[list[tuple[object, int]]] = []
    kept_rows: list[np.ndarray] = []

    def on_tagged(runtime: OnnxRuntime, x: np.ndarray, preds: Any, tagged: list[tuple[object, int]]) -> None:
        recorded.append(tagged)
        kept_rows.append(x)

    async def main() -> None:
        # a wait long enough for the first request to be cancelled while it is queued
        b = AdaptiveBatcher(max_batch_rows=64, max_wait_s=0.05, on_tagged=on_tagged)
        await b.start()
        gone = asyncio.create_task(b.predict(rt, np.zeros((2, 4), np.float32), "gone"))
        kept = asyncio.create_task(b.predict(rt, np.ones((1, 4), np.float32), "kept"))
        await asyncio.sleep(0.001)
        gone.cancel()
        await kept
        await b.stop()

    run(main)
    assert recorded == [[("kept", 1)]]
    np.testing.assert_array_equal(kept_rows[0], np.ones((1, 4), np.float32))


def test_a_failing_hook_never_fails_the_requests(runtimes: tuple[OnnxRuntime, OnnxRuntime]) -> None:
    def on_tagged(*args: Any) -> None:
        raise RuntimeError("the emitter is broken")

    async def main() -> list[Any]:
        b = AdaptiveBatcher(on_tagged=on_tagged)
        await b.start()
        results = await asyncio.gather(*(b.predict(runtimes[0], rows(1, i), f"r{i}") for i in range(5)))
        await b.stop()
        return results

    assert [r.outputs["probabilities"].shape for r in run(main)] == [(1, 2)] * 5
