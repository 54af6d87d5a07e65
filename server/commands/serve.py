"""`expertflow serve`: the OpenAI-compatible HTTP server (like `vllm serve`)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

import uvicorn
from safetensors import SafetensorError

from engine import AsyncLLM, ConfigError, EngineConfig, ModelConfig
from server.app import ServerSettings, abort_requests, build_app
from server.chat_template import ChatRenderer, ChatTemplateError, load_chat_template
from server.commands import Command
from server.config_args import add_config_args, config_from_args
from server.limits import add_limit_arguments, limits_from_args
from server.reasoning import REASONING_PARSERS
from server.shutdown import DrainingServer
from server.tool_parsers import TOOL_CALL_PARSERS

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="0.0.0.0", help="address to listen on")
    group.add_argument("--port", type=port, default=8000, help="port to listen on")
    group.add_argument(
        "--served-model-name",
        help="the model name clients send and /v1/models lists (default: the model folder's name)",
    )
    group.add_argument(
        "--api-key",
        default=os.environ.get("EXPERTFLOW_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1 routes (default: $EXPERTFLOW_API_KEY, "
        "unset: no key)",
    )
    group.add_argument(
        "--chat-template",
        help="Jinja chat template, as a file or inline text (default: the checkpoint's)",
    )
    group.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser',
    )
    group.add_argument(
        "--tool-call-parser",
        choices=tuple(TOOL_CALL_PARSERS),
        help="how the model writes tool calls in its text (hermes: <tool_call>{...}</tool_call>; "
        "mistral: [TOOL_CALLS] [...]; deepseek_v3: DeepSeek-V2.5/V3's tool-call tokens; "
        "deepseek_v31: DeepSeek-V3.1's; kimi_k2: Kimi-K2's, functions.NAME:INDEX as the call id; "
        "glm45, qwen3_coder, minimax_m2: their XML-like tags, typed by the tools' schemas; "
        "openai: gpt-oss's harmony messages to functions.NAME, with --reasoning-parser "
        "openai_gptoss; pythonic, llama4_pythonic: Llama 3.2's and 4's [NAME(K=V), ...])",
    )
    group.add_argument(
        "--reasoning-parser",
        choices=tuple(REASONING_PARSERS),
        help="split a thinking model's reasoning (up to </think>) out of chat answers, returned as "
        "`reasoning`; the rendered prompt's last think marker says whether an answer starts "
        "thinking, and with none deepseek_r1 and minimax_m2 assume it does, qwen3 and glm45 "
        "only after <think>; "
        "openai_gptoss: gpt-oss's harmony analysis messages are reasoning, its final one content",
    )
    add_limit_arguments(parser)
    add_config_args(parser, EngineConfig, "engine")


def port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535)")
    return number


def check_address(host: str, port: int) -> None:
    """Bind the address once, as uvicorn will, before the model loads: a host that does not resolve
    or a port in use failed only after loading (minutes for a large model), in uvicorn's words
    without the flag, exit 3."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({reason})") from exc


def run(args: argparse.Namespace) -> int:
    try:
        engine_config = config_from_args(EngineConfig, args)
        ModelConfig.from_pretrained(
            engine_config.model
        )  # a bad --model fails before binding a port
        chat_template = load_chat_template(args.chat_template)
        if args.enable_auto_tool_choice and args.tool_call_parser is None:
            raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser")
        if args.tool_call_parser and not args.enable_auto_tool_choice:
            logger.warning("--tool-call-parser parses only with --enable-auto-tool-choice")
        if args.tool_call_parser == "openai" and args.reasoning_parser != "openai_gptoss":
            raise ConfigError(
                "--tool-call-parser openai reads the calls that --reasoning-parser openai_gptoss "
                "leaves in the content: give both"
            )
        check_address(args.host, args.port)  # last: the flags' own errors come first
    except (ConfigError, ChatTemplateError) as exc:
        logger.error("%s", exc)
        return 2
    settings = ServerSettings(
        served_model_name=args.served_model_name or Path(engine_config.model).name,
        api_key=args.api_key,
        chat_template=chat_template,
        tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
        reasoning_parser=args.reasoning_parser,
        limits=limits_from_args(args),
    )
    try:  # loaded before the port is bound: a bad file is one line of error, not a traceback
        engine = AsyncLLM(engine_config, model_name=settings.served_model_name)
    except (ValueError, OSError, SafetensorError) as exc:  # ConfigError is a ValueError
        logger.error("%s", exc)
        return 2
    try:
        ChatRenderer(engine.tokenizer, chat_template).check()
        app = build_app(engine_config, settings, engine)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
        drain = settings.limits.graceful_shutdown_s
        DrainingServer(config, drain, lambda: abort_requests(app)).run()
    except ChatTemplateError as exc:
        logger.error("%s", exc)
        return 2
    finally:
        engine.shutdown()
    return 0


COMMAND = Command(
    name="serve",
    help="serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, ...)",
    add_arguments=add_arguments,
    run=run,
)
