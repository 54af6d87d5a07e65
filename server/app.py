"""The FastAPI app: routes, and the AsyncLLM it owns for its lifetime (created at startup, shut down
on exit). Handlers reach the engine only through the serving objects kept on `app.state`."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine import AsyncLLM, EngineConfig
from server.api_requests import CompletionRequest, DetokenizeRequest
from server.api_responses import (
    ChatCompletion,
    Completion,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
)
from server.auth import APIKeyMiddleware
from server.chat_answer import ChatFormats
from server.chat_requests import ChatCompletionRequest, TokenizeRequest
from server.chat_template import ChatRenderer
from server.errors import APIError, install_error_handlers
from server.generations import RequestPolicy
from server.limits import LIMITER, Limits, RequestLimitMiddleware
from server.reasoning import REASONING_PARSERS
from server.serving import PromptWorker, until_disconnected
from server.serving_chat import ChatServing
from server.serving_completion import CompletionServing
from server.tool_parsers import TOOL_CALL_PARSERS

logger = logging.getLogger(__name__)
router = APIRouter()
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def get(path: str) -> Callable[[Endpoint], Endpoint]:
    """A GET route that answers HEAD too, as HTTP asks of every GET (RFC 9110): liveness probes
    (load balancers, `curl -I`) send HEAD, which FastAPI answered 405. uvicorn sends HEAD's status
    and headers without the body. HEAD stays out of the OpenAPI schema, which would list every
    route twice, and whose clients (and fuzzers) expect an error to carry a body."""

    def register(endpoint: Endpoint) -> Endpoint:
        router.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)
        return router.get(path)(endpoint)

    return register


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    chat_template: str | None = None  # the template text, overriding the checkpoint's
    tool_call_parser: str | None = None  # set: tool_choice "auto" is allowed, parsed this way
    reasoning_parser: str | None = None  # set: reasoning is split out of chat answers this way
    limits: Limits = Limits()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ServerSettings = app.state.settings
    engine = app.state.loaded_engine or AsyncLLM(
        app.state.engine_config, model_name=settings.served_model_name
    )
    prompts = app.state.prompts = PromptWorker()
    try:
        renderer = ChatRenderer(engine.tokenizer, settings.chat_template)
        renderer.check()
        app.state.engine = engine
        policy = app.state.policy = RequestPolicy(
            timeout_s=settings.limits.request_timeout_s,
            max_prompt_logprobs=settings.limits.max_prompt_logprobs,
        )
        formats = ChatFormats(
            None
            if settings.tool_call_parser is None
            else TOOL_CALL_PARSERS[settings.tool_call_parser],
            None
            if settings.reasoning_parser is None
            else REASONING_PARSERS[settings.reasoning_parser],
        )
        name = settings.served_model_name
        app.state.chat = ChatServing(engine, name, policy, prompts, renderer, formats)
        app.state.completion = CompletionServing(engine, name, policy, prompts)
        app.state.renderer = renderer
        logger.info(
            "serving %s (max_model_len=%d)", settings.served_model_name, engine.max_model_len
        )
        yield
    finally:
        prompts.close()
        engine.shutdown()


def build_app(
    engine_config: EngineConfig, settings: ServerSettings, engine: AsyncLLM | None = None
) -> FastAPI:
    """The app; it serves `engine` if given (loaded already), else loads one at startup."""
    app = FastAPI(title="ExpertFlow", version=version("expertflow"), lifespan=lifespan)
    app.state.engine_config, app.state.loaded_engine = engine_config, engine
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(router)
    # Added first, so it runs inside the key check: a client without the key never takes a slot.
    app.add_middleware(
        RequestLimitMiddleware,
        limits=settings.limits,
        num_running=lambda: app.state.engine.num_running,
    )
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    return app


async def abort_requests(app: FastAPI) -> None:
    """Ends every request still in flight: the engine fails each one, so a stream gets an error
    event and [DONE], a whole response a 503, and the KV blocks are freed. Shutdown's last step."""
    app.state.policy.shutting_down = True
    await asyncio.to_thread(app.state.engine.shutdown)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request
) -> Response | ChatCompletion:
    return await until_disconnected(request, request.app.state.chat.create(body))


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response | Completion:
    limiter = request.scope.get(LIMITER)
    if limiter is not None:  # a batch waits as one engine request per prompt
        limiter.admit_batch(request.scope, len(body.prompts))
    return await until_disconnected(request, request.app.state.completion.create(body))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """vLLM's: count a prompt's tokens against the context before sending it."""
    request.app.state.completion.check_model(body.model)
    engine: AsyncLLM = request.app.state.engine
    prompts: PromptWorker = request.app.state.prompts
    if body.messages is not None:
        tools = [t.model_dump(exclude_none=True) for t in body.tools or ()] or None
        messages = [m.template_dict() for m in body.messages]
        render = request.app.state.renderer.render
        ids = (await prompts.run(render, messages, tools, body.template_options())).token_ids
    else:
        encode = functools.partial(
            engine.tokenizer.encode, add_special_tokens=body.add_special_tokens
        )
        ids = await prompts.run(encode, body.prompt)
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    request.app.state.completion.check_model(body.model)
    engine: AsyncLLM = request.app.state.engine
    vocab = engine.model_config.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))


@get("/v1/models")
async def models(request: Request) -> ModelList:
    return ModelList(data=[model_card(request)])


@get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """OpenAI's retrieve: the served model's card, 404 for any other name (ids may hold '/')."""
    card = model_card(request)
    if model_id != card.id:
        raise APIError(404, f"The model `{model_id}` does not exist.", code="model_not_found")
    return card


def model_card(request: Request) -> ModelCard:
    engine: AsyncLLM = request.app.state.engine
    return ModelCard(
        id=request.app.state.settings.served_model_name,
        root=request.app.state.engine_config.model,
        max_model_len=engine.max_model_len,
    )


@get("/health")
async def health() -> Response:
    """200 once the model is loaded: uvicorn only listens after the lifespan startup."""
    return Response(status_code=200)


@get("/version")
async def server_version() -> dict[str, str]:
    return {"version": version("expertflow")}


@get("/metrics")
async def metrics(request: Request) -> Response:
    """The engine's registry: it records request, token, latency and KV metrics itself."""
    registry = request.app.state.engine.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
