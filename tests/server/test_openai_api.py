"""The wire format, driven by the official OpenAI SDK (and httpx where the raw stream matters)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

if TYPE_CHECKING:
    from tests.server.conftest import RunningServer

MESSAGES = [{"role": "user", "content": "Write a function that adds two numbers."}]
GREEDY = {"temperature": 0.0}
ALWAYS_LENGTH = {"ignore_eos": True}  # a random model may emit EOS at any step


@pytest.fixture(scope="module")
def server(
    mixtral_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, server_launcher: Callable
) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("api-server")
    config = folder / "serve.yaml"
    # The YAML sets the context to 128 and the command line to 256: the command line must win.
    config.write_text("max_model_len: 128\nmax_num_seqs: 16\nkv_cache_blocks: 256\n")
    with server_launcher(
        mixtral_checkpoint, folder, "--config", str(config), "--max-model-len", "256"
    ) as running:
        yield running


@pytest.fixture(scope="module")
def tokenizer(mixtral_checkpoint: Path):
    return AutoTokenizer.from_pretrained(mixtral_checkpoint)


def sse_events(server: RunningServer, path: str, body: dict) -> list[str]:
    with server.http() as http, http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line.removeprefix("data: ") for line in response.iter_lines() if line]


def test_models_and_flag_precedence(server: RunningServer) -> None:
    models = server.client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_extra["max_model_len"] == 256  # CLI flag over --config value
    assert server.client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as missing:
        server.client.models.retrieve("org/other-model")
    assert missing.value.code == "model_not_found"


def test_a_repeated_system_prompt_is_served_from_the_prefix_cache(server: RunningServer) -> None:
    system = {"role": "system", "content": "You answer in Python. " * 12}
    hits = 'expertflow_prefix_cache_hits_total{model_name="tiny"} '

    def hits_so_far() -> float:
        metrics = httpx.get(f"{server.url}/metrics").text
        return float(metrics.split(hits, 1)[1].split("\n", 1)[0])

    before = hits_so_far()
    usages = [
        server.client.chat.completions.create(
            model="tiny", messages=[system, {"role": "user", "content": question}], max_tokens=2
        ).usage
        for question in ("What is a list?", "What is a dict?")
    ]
    cached = [u.prompt_tokens_details.cached_tokens for u in usages]
    assert cached[0] == 0 and cached[1] > 0 and cached[1] % 16 == 0  # whole KV blocks
    assert cached[1] < usages[1].prompt_tokens
    assert hits_so_far() - before == cached[1]


def test_open_routes_need_no_key(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    assert "expertflow_kv_cache_usage_ratio" in httpx.get(f"{server.url}/metrics").text


def test_get_routes_answer_head(server: RunningServer) -> None:
    """Liveness probes (load balancers, `curl -I`) send HEAD, which was a 405: now GET's status
    and headers, without the body; /v1 routes still need the key."""
    with server.http() as http:
        for path in ("/health", "/version", "/metrics", "/v1/models", "/v1/models/tiny"):
            head, get = http.head(path), http.get(path)
            assert head.status_code == get.status_code == 200 and head.content == b"", path
            assert head.headers.get("content-type") == get.headers.get("content-type"), path
        assert http.head("/v1/models/other").status_code == 404
        assert "head" not in http.get("/openapi.json").json()["paths"]["/health"]
    assert httpx.head(f"{server.url}/health").status_code == 200
    assert httpx.head(f"{server.url}/v1/models").status_code == 401


def test_chat_non_streaming(server: RunningServer, tokenizer) -> None:
    out = server.client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=7, extra_body=ALWAYS_LENGTH, **GREEDY
    )
    assert (
        out.id.startswith("chatcmpl-") and out.object == "chat.completion" and out.model == "tiny"
    )
    assert out.created > 0
    [choice] = out.choices
    assert (
        choice.index == 0
        and choice.message.role == "assistant"
        and choice.finish_reason == "length"
    )
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    expected_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert out.usage.prompt_tokens == expected_prompt
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == expected_prompt + 7


def test_completion_token_ids_and_text(server: RunningServer, tokenizer) -> None:
    client = server.client
    ids = tokenizer.encode("def add(a, b):")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5, **GREEDY)
    by_text = client.completions.create(
        model="tiny", prompt="def add(a, b):", max_tokens=5, **GREEDY
    )
    assert by_ids.id.startswith("cmpl-") and by_ids.object == "text_completion"
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_max_completion_tokens_and_default_length(server: RunningServer) -> None:
    client = server.client
    out = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_completion_tokens=3, extra_body=ALWAYS_LENGTH
    )
    assert out.usage.completion_tokens == 3
    out = client.completions.create(model="tiny", prompt="x", extra_body=ALWAYS_LENGTH)
    assert out.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_stop_string_cuts_text(server: RunningServer) -> None:
    client = server.client
    kwargs = {"model": "tiny", "prompt": "import torch", "max_tokens": 24, **GREEDY}
    full = client.completions.create(**kwargs, extra_body=ALWAYS_LENGTH).choices[0].text
    assert len(full) >= 6, f"the tiny model's greedy text is too short to cut: {full!r}"
    stop = full[3:5]
    out = client.completions.create(
        **kwargs, stop=[stop, "never-generated"], extra_body=ALWAYS_LENGTH
    )
    assert out.choices[0].text == full[: full.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**kwargs, stop=stop, stream=True, extra_body=ALWAYS_LENGTH)
    assert "".join(c.choices[0].text for c in streamed) == full[: full.find(stop)]


def test_stop_token_ids(server: RunningServer) -> None:
    out = server.client.completions.create(
        model="tiny", prompt="x", max_tokens=8, extra_body={"stop_token_ids": list(range(384))}
    )
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 1


def test_logit_bias_forces_a_token(server: RunningServer, tokenizer) -> None:
    token = tokenizer.encode("abc", add_special_tokens=False)[-1]
    out = server.client.completions.create(
        model="tiny",
        prompt="x",
        max_tokens=4,
        logit_bias={str(token): 100},
        extra_body=ALWAYS_LENGTH,
        **GREEDY,
    )
    assert out.choices[0].text == tokenizer.decode([token] * 4)


def test_n_choices_sum_usage(server: RunningServer) -> None:
    out = server.client.chat.completions.create(
        model="tiny", messages=MESSAGES, n=2, max_tokens=4, seed=1, extra_body=ALWAYS_LENGTH
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 8


def test_seed_reproducible(server: RunningServer) -> None:
    client = server.client

    def sample(seed: int) -> str:
        return client.completions.create(
            model="tiny", prompt="The quick", max_tokens=12, temperature=1.0, seed=seed,
            extra_body=ALWAYS_LENGTH,
        ).choices[0].text  # fmt: skip

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1  # and the seed matters


@pytest.mark.parametrize("n", [1, 2])
def test_chat_stream_matches_non_stream(server: RunningServer, n: int) -> None:
    client = server.client
    kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 20, "n": n, **GREEDY}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    texts, roles, finishes = [""] * n, [[] for _ in range(n)], [[] for _ in range(n)]
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id
        for choice in chunk.choices:
            roles[choice.index] += [choice.delta.role] if choice.delta.role else []
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] += [choice.finish_reason] if choice.finish_reason else []
    first_per_choice = {c.choices[0].index: c for c in reversed(chunks)}
    assert all(first_per_choice[i].choices[0].delta.role == "assistant" for i in range(n))
    assert roles == [["assistant"]] * n
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [[c.finish_reason] for c in whole.choices]


def test_completion_stream_matches_non_stream(server: RunningServer) -> None:
    client = server.client
    kwargs = {"model": "tiny", "prompt": "def add", "max_tokens": 20, "logprobs": 2, **GREEDY}
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [
        whole.finish_reason
    ]
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert sum((lp.tokens for lp in streamed), []) == whole.logprobs.tokens
    assert sum((lp.text_offset for lp in streamed), []) == whole.logprobs.text_offset


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_usage_chunk_then_done(server: RunningServer, path: str) -> None:
    prompt = {"messages": MESSAGES} if "chat" in path else {"prompt": "hello"}
    body = {
        **prompt,
        "max_tokens": 5,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(server, path, {**body, "ignore_eos": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 10
    u = usage_chunk["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert all("usage" not in c for c in chunks[:-1])
    finishes = [ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert sorted(finishes) == [0, 1]
    events = sse_events(server, path, {**body, "stream_options": {"include_usage": False}})
    assert all(json.loads(e)["choices"] for e in events[:-1])  # no usage chunk unless asked


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_continuous_usage_rides_on_every_chunk(server: RunningServer, path: str) -> None:
    """vLLM's `stream_options.continuous_usage_stats`: each chunk carries the usage so far."""
    prompt = {"messages": MESSAGES} if "chat" in path else {"prompt": "hello"}
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {**prompt, "max_tokens": 5, "stream": True, "stream_options": options}
    chunks = [json.loads(e) for e in sse_events(server, path, {**body, **ALWAYS_LENGTH})[:-1]]
    generated = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"] is not None for c in chunks)
    assert generated == sorted(generated) and generated[-1] == 5
    assert len({c["usage"]["prompt_tokens"] for c in chunks}) == 1
    alone = {**body, "stream_options": {"continuous_usage_stats": True}}  # vLLM: not alone
    events = sse_events(server, path, {**alone, **ALWAYS_LENGTH})[:-1]
    assert all("usage" not in json.loads(e) for e in events)


def test_chat_logprobs(server: RunningServer) -> None:
    out = server.client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the best


def test_chat_logprob_bytes_rebuild_characters_split_across_tokens(server: RunningServer) -> None:
    """OpenAI's `bytes` are each token's own: joined, they give the text back even where one
    character's bytes fall in several tokens (each of which shows as U+FFFD on its own)."""
    word = "\U0001f600\u4e2d\u6587\u00e9"
    schema = {"name": "w", "schema": {"type": "string", "enum": [word]}}
    out = server.client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=40,
        logprobs=True,
        top_logprobs=2,
        response_format={"type": "json_schema", "json_schema": schema},
        **GREEDY,
    )
    text, content = out.choices[0].message.content, out.choices[0].logprobs.content
    joined = b"".join(bytes(entry.bytes) for entry in content).decode()
    assert json.loads(text) == word and joined.startswith(text), (joined, text)
    assert any(entry.token == "\ufffd" for entry in content)  # a character split across tokens
    for top in (top for entry in content for top in entry.top_logprobs):  # whole characters
        assert top.token == "\ufffd" or top.bytes == list(top.token.encode())


def test_completion_logprobs(server: RunningServer) -> None:
    out = server.client.completions.create(
        model="tiny", prompt="x", max_tokens=6, logprobs=2, **GREEDY
    )
    lp = out.choices[0].logprobs
    assert (
        len(lp.tokens)
        == len(lp.token_logprobs)
        == len(lp.top_logprobs)
        == out.usage.completion_tokens
    )
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)  # equal texts share a key


def test_completion_echo_scores_the_prompt(
    server: RunningServer, tokenizer, mixtral_checkpoint: Path
) -> None:
    """What evaluation harnesses send to score a text: echo, logprobs, one new token."""
    prompt = "def add(a, b): return a + b"
    ids = tokenizer.encode(prompt)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "logprobs": 2, **GREEDY}
    out = server.client.completions.create(**body, echo=True)
    choice, plain = out.choices[0], server.client.completions.create(**body).choices[0]
    assert choice.text == prompt + plain.text
    lp = choice.logprobs
    assert lp.tokens[0] == tokenizer.decode(ids[:1]) and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes it
    assert lp.token_logprobs[-1] == plain.logprobs.token_logprobs[0]
    assert lp.text_offset[len(ids)] == len(prompt) and lp.text_offset == sorted(lp.text_offset)
    hf = AutoModelForCausalLM.from_pretrained(mixtral_checkpoint, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1], dim=-1)  # [P-1, V]
    expected = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs[1:])
    # token ids echo as their text; without logprobs the prompt's are not computed
    by_ids = server.client.completions.create(
        model="tiny", prompt=ids, max_tokens=1, echo=True, **GREEDY
    )
    assert by_ids.choices[0].text == tokenizer.decode(ids) + plain.text
    assert by_ids.choices[0].logprobs is None and by_ids.usage.prompt_tokens == len(ids)


def test_vllm_prompt_logprobs_score_each_prompt_token(server: RunningServer, tokenizer) -> None:
    """vLLM's `prompt_logprobs`: per completions choice (and at the top of a chat answer), one
    entry per prompt token keyed by token id: the token itself with its rank, then the best k.
    The token's scores equal the echoed ones, and asking for more of one never widens the other."""
    prompt = "def add(a, b): return a + b"
    ids = tokenizer.encode(prompt)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "echo": True, **GREEDY}
    with server.http() as http:
        out = http.post("/v1/completions", json={**body, "logprobs": 1, "prompt_logprobs": 3})
        assert out.status_code == 200, out.text
        choice = out.json()["choices"][0]
        chat = http.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": MESSAGES, "max_tokens": 1, "prompt_logprobs": 0},
        ).json()
        streamed = http.post("/v1/completions", json={**body, "prompt_logprobs": 1, "stream": True})
    scores = choice["prompt_logprobs"]
    assert len(scores) == len(ids) and scores[0] is None
    echoed = choice["logprobs"]
    for position, (token, entry) in enumerate(zip(ids[1:], scores[1:], strict=True), start=1):
        mine = entry[str(token)]
        assert mine["logprob"] == pytest.approx(echoed["token_logprobs"][position])
        above = sum(e["logprob"] > mine["logprob"] for e in entry.values())
        assert mine["rank"] == above + 1 if mine["rank"] <= 3 else above == 3
        best = sorted(entry.values(), key=lambda e: -e["logprob"])[:3]
        assert [e["rank"] for e in best] == [1, 2, 3] or mine in best  # ties share a rank
        assert len(entry) in (3, 4) and len(echoed["top_logprobs"][position]) <= 2
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert all(len(e) == 1 for e in chat["prompt_logprobs"][1:])  # k = 0: the token alone
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt_logprobs"


def test_echo_offsets_run_on_where_token_texts_differ_from_the_prompt(
    server: RunningServer,
) -> None:
    # "é" and "😀" are byte-level tokens whose texts alone are "\ufffd": they add up differently.
    for prompt in ("café 😀 ok", "x"):
        out = server.client.completions.create(
            model="tiny", prompt=prompt, max_tokens=3, logprobs=0, echo=True, **GREEDY
        )
        offsets = out.choices[0].logprobs.text_offset
        assert offsets == sorted(offsets) and out.choices[0].text.startswith(prompt)


def test_completion_echo_stream_matches_non_stream(server: RunningServer) -> None:
    body = {"model": "tiny", "prompt": "import torch", "max_tokens": 5, "logprobs": 1, "n": 2}
    body |= {"echo": True, "seed": 3, **ALWAYS_LENGTH}
    with server.http() as http:
        whole = http.post("/v1/completions", json=body).json()["choices"]
    chunks = [
        json.loads(e) for e in sse_events(server, "/v1/completions", {**body, "stream": True})[:-1]
    ]
    for choice in whole:
        parts = [c for ch in chunks for c in ch["choices"] if c["index"] == choice["index"]]
        assert "".join(p["text"] for p in parts) == choice["text"]
        assert parts[0]["text"].startswith("import torch")
        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            streamed = [v for p in parts for v in p["logprobs"][field]]
            assert streamed == choice["logprobs"][field]


def test_a_batch_of_prompts_answers_each_as_alone(server: RunningServer, tokenizer) -> None:
    """Several prompts in one completions request (texts or token id lists): prompt p's choice i
    is choice p * n + i, each as the prompt alone would get it, echo included; usage sums."""
    prompts = ["def add(a, b):", "import os\n", "The quick brown fox"]
    body = {"model": "tiny", "max_tokens": 6, "n": 2, "logprobs": 1, "echo": True, **GREEDY}
    alone = [server.client.completions.create(**body, prompt=p) for p in prompts]
    for batch in (prompts, [tokenizer.encode(p) for p in prompts]):
        out = server.client.completions.create(**body, prompt=batch)
        assert [c.index for c in out.choices] == list(range(6))
        for p, single in enumerate(alone):
            for i, expected in enumerate(single.choices):
                got = out.choices[p * 2 + i]
                assert got.text == expected.text and got.text.startswith(prompts[p])
                scores = got.logprobs.token_logprobs  # batched: the same up to rounding
                assert scores[0] is None and scores[1:] == pytest.approx(
                    expected.logprobs.token_logprobs[1:], abs=1e-4
                )
        for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert getattr(out.usage, field) == sum(getattr(a.usage, field) for a in alone)
    stream = {**body, "prompt": prompts, "stream": True, "stream_options": {"include_usage": True}}
    events = [json.loads(e) for e in sse_events(server, "/v1/completions", stream)[:-1]]
    whole = server.client.completions.create(**body, prompt=prompts)
    for choice in whole.choices:
        parts = [c for e in events for c in e["choices"] if c["index"] == choice.index]
        assert "".join(p["text"] for p in parts) == choice.text
        assert [p["finish_reason"] for p in parts if p["finish_reason"]] == [choice.finish_reason]
    assert events[-1]["usage"]["completion_tokens"] == whole.usage.completion_tokens


def test_a_refused_prompt_refuses_its_batch_and_frees_the_rest(server: RunningServer) -> None:
    """One prompt over the context: a 400 for the whole batch, and its other prompts, already
    started, are aborted (the KV cache is empty again)."""
    body = {"model": "tiny", "max_tokens": 50, "prompt": ["hello", "x " * 400], **ALWAYS_LENGTH}
    kv = 'expertflow_kv_cache_usage_ratio{model_name="tiny"} '
    aborted = 'expertflow_request_success_total{finished_reason="abort",model_name="tiny"} '

    def metric(http: httpx.Client, name: str) -> float:
        text = http.get("/metrics").text
        return float(text.split(name, 1)[1].split("\n", 1)[0]) if name in text else 0.0

    with server.http() as http:
        aborts = metric(http, aborted)
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "context_length_exceeded"
        for _ in range(50):
            if metric(http, kv) == 0.0 and metric(http, aborted) == aborts + 1:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the batch's other prompt was not aborted")


def test_structured_outputs_follow_the_schema(server: RunningServer) -> None:
    schema = {
        "type": "object",
        "properties": {"label": {"enum": ["yes", "no"]}, "ok": {"type": "boolean"}},
        "required": ["label", "ok"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 60, **GREEDY}
    out = server.client.chat.completions.create(**body, response_format=response_format)
    content = out.choices[0].message.content
    value = json.loads(content, strict=False)
    assert set(value) == {"label", "ok"} and value["label"] in ("yes", "no")
    assert out.choices[0].finish_reason == "stop"
    stream = server.client.chat.completions.create(
        **body, response_format=response_format, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == content
    anything = server.client.completions.create(  # vLLM's extension: completions take one too
        model="tiny",
        prompt="x",
        max_tokens=20,
        extra_body={"response_format": {"type": "json_object"}},
        **GREEDY,
    )
    assert anything.choices[0].text.startswith("{")


def test_vllm_structured_outputs_choice_regex_and_json(server: RunningServer) -> None:
    """vLLM's `structured_outputs` extension, on both endpoints."""
    body = {"model": "tiny", "max_tokens": 30, **GREEDY}
    chat = server.client.chat.completions.create(
        **body, messages=MESSAGES, extra_body={"structured_outputs": {"choice": ["red", "blue"]}}
    )
    assert chat.choices[0].message.content in ("red", "blue")
    regex = server.client.completions.create(
        **body, prompt="x", extra_body={"structured_outputs": {"regex": "[a-c]{4}"}}
    )
    assert re.fullmatch("[a-c]{4}", regex.choices[0].text)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    as_json = server.client.completions.create(
        **body, prompt="x", extra_body={"structured_outputs": {"json": schema}}
    )
    assert isinstance(json.loads(as_json.choices[0].text, strict=False)["ok"], bool)


def test_a_grammar_nothing_can_complete_fails_its_own_request(server: RunningServer) -> None:
    """A 400 when its first token has no choice (a stream has not started), a 400 error event
    when a later one has none; the server answers the next request."""
    body = {"model": "tiny", "max_tokens": 5, "prompt": "x", **GREEDY}
    with server.http() as http:
        never = {"structured_outputs": {"regex": "[^\\s\\S]"}}
        refused = http.post("/v1/completions", json={**body, **never})
        streamed = http.post("/v1/completions", json={**body, **never, "stream": True})
    for response in (refused, streamed):
        error = response.json()["error"]
        assert response.status_code == 400 and "allows no token" in error["message"], error
    late = {"structured_outputs": {"regex": "ab[^\\s\\S]"}, "stream": True}
    events = sse_events(server, "/v1/completions", {**body, **late})
    assert json.loads(events[0])["choices"][0]["text"] == "a"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 400 and "allows no token" in error["message"] and events[-1] == "[DONE]"
    assert server.client.completions.create(**body).choices[0].finish_reason in ("stop", "length")


def test_tokenize_counts_what_generation_counts(server: RunningServer, tokenizer) -> None:
    with server.http() as http:
        by_prompt = http.post("/tokenize", json={"prompt": "def add(a, b):"}).json()
        by_messages = http.post("/tokenize", json={"messages": MESSAGES}).json()
        back = http.post("/detokenize", json={"tokens": by_prompt["tokens"]}).json()
    assert by_prompt["tokens"] == tokenizer.encode("def add(a, b):")
    assert by_prompt["count"] == len(by_prompt["tokens"]) and by_prompt["max_model_len"] == 256
    chat = server.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1)
    assert by_messages["count"] == chat.usage.prompt_tokens  # the chat template included
    assert back["prompt"] == tokenizer.decode(by_prompt["tokens"])


def test_chat_template_options_reach_both_endpoints(server: RunningServer, tokenizer) -> None:
    """continue_final_message leaves the assistant's message open: what the chat counts is what
    /tokenize renders, and the prompt ends with the message's text."""
    started = [*MESSAGES, {"role": "assistant", "content": "def add"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    with server.http() as http:
        rendered = http.post("/tokenize", json={"messages": started, **options}).json()
        refused = http.post(
            "/tokenize", json={"messages": MESSAGES, "continue_final_message": True}
        )
    assert tokenizer.decode(rendered["tokens"]).endswith("<|assistant|>def add")
    chat = server.client.chat.completions.create(
        model="tiny", messages=started, max_tokens=1, extra_body=options
    )
    assert chat.usage.prompt_tokens == rendered["count"]
    assert refused.status_code == 400 and "add_generation_prompt" in refused.text


def test_message_forms(server: RunningServer) -> None:
    """Text parts join like a plain string; `developer` is rendered as `system`; unknown fields
    are ignored with a warning in the server log."""
    client = server.client

    def prompt_tokens(messages: list[dict], **extra: object) -> int:
        out = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=1, extra_body=extra
        )
        return out.usage.prompt_tokens

    plain = prompt_tokens(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]
    )
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}]
    assert prompt_tokens(developer, some_future_field=1) == plain
    assert "ignoring unknown fields: some_future_field" in server.log()
