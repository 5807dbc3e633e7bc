"""Micro-batching in front of a real ONNX model: requests that arrive together share a call, a
lone request never waits, batches stay bounded, and a failed call fails only its requests."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from helpers.digits import synthetic_digits

from mnist_pipeline.serve.batching import MicroBatcher


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    """A small MLP, exported and loaded as the server loads a version's ONNX export."""
    import keras

    from mnist_pipeline.tracking.mnist_onnx import OnnxDigitModel
    from mnist_pipeline.training import models

    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((28, 28), dtype="uint8"),
            keras.layers.Rescaling(1 / 255, dtype="float32"),
            keras.layers.Flatten(dtype="float32"),
            keras.layers.Dense(10, activation="softmax", dtype="float32"),
        ]
    )
    folder = tmp_path_factory.mktemp("onnx")
    models.export_onnx(model, folder / "model.onnx")
    return OnnxDigitModel(folder)


class Recorded:
    """The model's predict, slowed by `delay_s` per call, recording each call's batch size."""

    def __init__(self, model, delay_s: float = 0.0) -> None:
        self.model, self.delay_s, self.sizes = model, delay_s, []
        self.lock = threading.Lock()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self.lock:
            self.sizes.append(len(images))
        time.sleep(self.delay_s)
        return self.model.predict(images)


IMAGES = synthetic_digits(64, seed=3)[0]


def test_batching_concurrent_requests_share_a_call(onnx_model):
    predict = Recorded(onnx_model, delay_s=0.05)
    batcher = MicroBatcher(predict, max_images=256, max_wait_s=0.002)

    async def scenario():
        return await asyncio.gather(*(batcher.submit(IMAGES[i : i + 1]) for i in range(16)))

    answers = asyncio.run(scenario())
    # The first call starts at once with the first request; the 15 that queued behind it
    # share the next one.
    assert len(predict.sizes) <= 3 and sum(predict.sizes) == 16, predict.sizes
    for i, answer in enumerate(answers):  # each request gets its own rows back
        np.testing.assert_allclose(answer, onnx_model.predict(IMAGES[i : i + 1]), atol=1e-6)


def test_batching_a_lone_request_does_not_wait(onnx_model):
    """With a wait of a whole second allowed, a request on its own is answered at once."""
    batcher = MicroBatcher(Recorded(onnx_model), max_images=256, max_wait_s=1.0)

    async def one() -> float:
        await batcher.submit(IMAGES[:1])  # the batcher's task is up
        started = time.perf_counter()
        await batcher.submit(IMAGES[1:2])
        return time.perf_counter() - started

    assert asyncio.run(one()) < 0.25


def test_batching_waits_briefly_for_a_request_being_parsed(onnx_model):
    """A request still being read or parsed joins the batch if it arrives within the wait."""
    predict = Recorded(onnx_model)
    batcher = MicroBatcher(predict, max_images=256, max_wait_s=0.5)

    async def scenario():
        async def slow_client():
            with batcher.expecting():
                await asyncio.sleep(0.05)  # reading and parsing its body
            return await batcher.submit(IMAGES[1:3])

        late = asyncio.ensure_future(slow_client())
        await asyncio.sleep(0.01)  # the slow client has started reading
        first = await batcher.submit(IMAGES[:1])
        return first, await late

    first, second = asyncio.run(scenario())
    assert predict.sizes == [3]  # one call for both
    assert first.shape == (1, 10) and second.shape == (2, 10)


def test_batching_keeps_every_call_within_its_bound(onnx_model):
    predict = Recorded(onnx_model, delay_s=0.02)
    batcher = MicroBatcher(predict, max_images=8, max_wait_s=0.002)

    async def scenario():
        return await asyncio.gather(*(batcher.submit(IMAGES[3 * i : 3 * i + 3]) for i in range(10)))

    answers = asyncio.run(scenario())
    assert sum(predict.sizes) == 30 and max(predict.sizes) <= 8, predict.sizes
    assert [len(a) for a in answers] == [3] * 10
    alone = asyncio.run(MicroBatcher(predict, max_images=8).submit(IMAGES[:20]))
    assert alone.shape == (20, 10)  # a request bigger than the bound runs on its own


def test_batching_a_failed_call_fails_its_requests_and_the_next_call_works(onnx_model):
    calls = []

    def flaky(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return onnx_model.predict(images)

    batcher = MicroBatcher(flaky)

    async def scenario():
        with pytest.raises(RuntimeError, match="out of memory"):
            await batcher.submit(IMAGES[:1])
        return await batcher.submit(IMAGES[:2])

    assert asyncio.run(scenario()).shape == (2, 10)


def test_batching_bounds_are_checked():
    with pytest.raises(ValueError, match="max_images: got 0"):
        MicroBatcher(lambda images: images, max_images=0)
    with pytest.raises(ValueError, match="max_wait_s: got 2"):
        MicroBatcher(lambda images: images, max_wait_s=2)
