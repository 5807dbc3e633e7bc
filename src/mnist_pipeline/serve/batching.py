"""Micro-batching: requests that arrive together are answered by one model call.

A model call on 64 images costs little more than on one, so when several clients ask at
once, one call for all of them serves each sooner than a call each. `MicroBatcher.submit`
queues a request's images; one task takes what is queued, up to `max_images`, and runs one
call: on the event loop itself when it is small (cheaper than any hand-over), else in the
batcher's one model thread (ONNX Runtime releases the GIL while it computes, so the loop
reads and parses the next requests meanwhile). Requests that arrive while a call runs wait
for the next one, which takes them all.

A request never waits for company: the batch closes as soon as nothing more is queued,
unless another request is at that moment being read or parsed (`arriving`), in which case
it waits for it at most `max_wait_s` (2 ms by default).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

DEFAULT_MAX_IMAGES = 256  # per model call: a bigger request still runs, alone
DEFAULT_MAX_WAIT_S = 0.002  # the longest a batch waits for a request being parsed
POLL_S = 0.0002  # how often it looks while it waits
# Calls on this many images or fewer run on the event loop itself: a small model call costs
# less (~0.1 ms) than handing it to the model thread and back.
INLINE_IMAGES = 32


class MicroBatcher:
    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        *,
        max_images: int = DEFAULT_MAX_IMAGES,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
    ) -> None:
        if max_images < 1:
            raise ValueError(f"max_images: got {max_images}, expected an integer >= 1")
        if not 0 <= max_wait_s <= 1:
            raise ValueError(f"max_wait_s: got {max_wait_s}, expected seconds in [0, 1]")
        self.predict = predict
        self.max_images = max_images
        self.max_wait_s = max_wait_s
        self.arriving = 0  # requests being read or parsed right now
        self.calls = 0  # model calls made (for tests and metrics)
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        # One thread for every model call: the event loop keeps reading and parsing the
        # next requests on the other core meanwhile.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Around reading and parsing a request that will be submitted: a batch being
        formed waits (briefly) for it."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """The model's output for `images`, from a call it may share with other requests."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop:  # a queue serves one event loop
            self._queue, self._loop, self._task = asyncio.Queue(), loop, None
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._serve(self._queue))
        answer: asyncio.Future = loop.create_future()
        await self._queue.put((images, answer))
        return await answer

    async def _serve(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        carried = None  # a request that did not fit the last batch: it opens the next
        while True:
            batch = [carried if carried is not None else await queue.get()]
            carried = None
            # One turn of the loop: requests whose bodies are already here get to queue.
            await asyncio.sleep(0)
            count = len(batch[0][0])
            deadline = loop.time() + self.max_wait_s
            while count < self.max_images:
                try:
                    item = queue.get_nowait()
                except asyncio.QueueEmpty:
                    if not self.arriving or loop.time() >= deadline:
                        break
                    await asyncio.sleep(POLL_S)
                    continue
                if count + len(item[0]) > self.max_images:
                    carried = item
                    break
                batch.append(item)
                count += len(item[0])
            await self._run(batch)

    async def _run(self, batch: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        images = batch[0][0] if len(batch) == 1 else np.concatenate([b[0] for b in batch])
        self.calls += 1
        try:
            if len(images) <= INLINE_IMAGES:  # cheaper than handing it to the thread
                outputs = self.predict(images)
            else:
                outputs = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.predict, images
                )
        except Exception as err:  # every waiting request gets the failure, none hangs
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(err)
            return
        start = 0
        for part, answer in batch:
            if not answer.done():  # a client that went away cancelled its future
                answer.set_result(outputs[start : start + len(part)])
            start += len(part)
