"""AsyncLLM: the server's handle on the engine. One background thread owns the model and runs
`LLMEngine.step()`; requests and aborts reach it through a queue, outputs come back to each request's
asyncio stream. Leaving a stream early (client gone, task cancelled) aborts its request."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.llm_engine import EngineStepError, LLMEngine
from engine.outputs import RequestOutput
from engine.sampling import RequestError, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: _Stream


@dataclass
class _Abort:
    request_id: str


class _Stream:
    """Delivers engine-thread outputs to one request's coroutine."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone (server shutting down)
            logger.debug("dropped an output for a closed event loop")


class AsyncLLM:
    def __init__(self, config: EngineConfig, model_name: str | None = None) -> None:
        self.engine = LLMEngine(config, model_name)
        self.tokenizer = self.engine.tokenizer
        self.token_text = self.engine.detokenizer.token_text  # one token as logprobs show it
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len
        self.metrics = self.engine.metrics
        self._inbox: queue.Queue[_Add | _Abort | None] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self.num_running = 0  # requests in the running batch, set by the engine thread each turn
        self._thread = threading.Thread(target=self._loop, name="expertflow-engine", daemon=True)
        self._thread.start()
        # At the interpreter's exit too: a daemon thread still inside a torch op when Python
        # finalizes is unwound through C++ frames that may not unwind, and the process aborts
        # ("terminate called without an active exception").
        self._stop_thread = weakref.finalize(self, _stop_engine_thread, self._inbox, self._thread)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs until the request finishes; raises RequestError if refused."""
        if self._stopped:
            raise RuntimeError("the engine is shut down")
        if params.guided is not None:  # compiled here, off the engine thread that serves everyone
            await asyncio.to_thread(self.engine.grammars.compile, params.guided)
        stream = _Stream(asyncio.get_running_loop())
        self._inbox.put(_Add(request_id, prompt_token_ids, params, stream))
        if self._stopped:  # shut down while the grammar compiled: nobody may read the request
            raise RuntimeError("the engine is shut down")
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                while not stream.queue.empty() and not isinstance(item, BaseException):
                    item = (
                        stream.queue.get_nowait()
                    )  # outputs are cumulative: only the newest matters
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._inbox.put(_Abort(request_id))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def stats(self) -> dict[str, float]:
        return self.engine.stats()

    def shutdown(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._stop_thread()
            if not self._thread.is_alive():  # a step still running keeps its link
                self.engine.offload.close()

    # ---- engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self.num_running = int(self.engine.stats()["num_running"])
            block = not self.engine.has_unfinished()
            try:
                while True:
                    message = self._inbox.get(block=block)
                    block = False
                    if message is None:
                        self._fail_all(RuntimeError("the engine shut down"))
                        return
                    self._handle(message)
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except EngineStepError as exc:
                for request_id in exc.request_ids:
                    stream = self._streams.pop(request_id, None)
                    if stream is not None:
                        stream.put(RuntimeError(f"internal engine error: {exc.__cause__!r}"))
                continue
            except Exception as exc:  # a bug outside the model step: fail everyone, keep serving
                logger.exception("engine step failed outside the model")
                self._fail_all(RuntimeError(f"internal engine error: {exc!r}"))
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out if out.error is None else RequestError(out.error))
                    if out.finished:
                        del self._streams[out.request_id]

    def _handle(self, message: _Add | _Abort) -> None:
        if isinstance(message, _Abort):
            stream = self._streams.pop(message.request_id, None)
            output = self.engine.abort(message.request_id)
            if stream is not None and output is not None:
                stream.put(output)  # a final "abort" output ends a stream still being read
            return
        try:
            self.engine.add_request(message.request_id, message.prompt_token_ids, message.params)
        except RequestError as exc:
            message.stream.put(exc)
            return
        except Exception as exc:  # a bug on one request must not stop the engine thread
            logger.exception("add_request failed for %s", message.request_id)
            message.stream.put(RuntimeError(f"internal engine error: {exc!r}"))
            return
        self._streams[message.request_id] = message.stream

    def _fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            stream.put(error)
        self._streams.clear()


def _stop_engine_thread(inbox: queue.Queue[_Add | _Abort | None], thread: threading.Thread) -> None:
    """Let the engine thread finish its step and fail what is left, then wait for it."""
    inbox.put(None)
    thread.join(timeout=30)
