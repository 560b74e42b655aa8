"""The LLM layer against a real local HTTP server, through the real openai and anthropic SDKs.

Scripted errors carry ``retry-after-ms: 10``, which both SDKs honour, so retries take milliseconds
rather than their default 0.5-8 s backoff; only the timeout case pays one backoff (~0.5 s).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorascope.llm.cache import CacheKey, DiskCache
from lorascope.llm.clients import CachedClient, Client, LlmError, make_client, run_all
from lorascope.llm.pricing import estimate_cost, price
from lorascope.llm.structured import JsonReplyError, JsonSchema, parse_json

from tests.llm_server import Api, LlmServer, Reply

OPENAI_KEY = "test-openai-" + secrets.token_hex(8)  # made per run: no key-like literal
ANTHROPIC_KEY = "test-anthropic-" + secrets.token_hex(8)
MODELS: dict[Api, str] = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-5"}
APIS: list[Api] = ["openai", "anthropic"]


@pytest.fixture(autouse=True)
def api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANTHROPIC_KEY)


def client_for(srv: LlmServer, api: Api, **kwargs) -> Client:
    base_url = f"{srv.url}/v1" if api == "openai" else srv.url
    return make_client(api, kwargs.pop("model", MODELS[api]), base_url=base_url, **kwargs)


def ask(client: Client, prompt: str, max_tokens: int = 32, temperature: float | None = 0.0):
    return asyncio.run(client.complete(prompt, max_tokens=max_tokens, temperature=temperature))


def answer_all(client: Client, prompts: list[str], concurrency: int = 4) -> list:
    async def one(prompt: str):
        return await client.complete(prompt, max_tokens=32, temperature=0.0)

    return asyncio.run(run_all(prompts, one, concurrency, "test"))


# ----------------------------------------------------------------------------------------- answers
@pytest.mark.parametrize("api", APIS)
def test_answer_text_usage_and_request(api: Api) -> None:
    with LlmServer(lambda *_: Reply("a short label")) as srv:
        completion = ask(client_for(srv, api), "three word prompt", max_tokens=50, temperature=0.3)
    assert (completion.text, completion.input_tokens, completion.output_tokens) == ("a short label", 3, 3)
    assert completion.model == MODELS[api] and not completion.cached and completion.retries == 0
    (request,) = srv.requests
    assert request.body["messages"] == [{"role": "user", "content": "three word prompt"}]
    assert (request.body["max_tokens"], request.body["temperature"]) == (50, 0.3)
    assert request.headers["authorization"] == f"Bearer {OPENAI_KEY if api == 'openai' else ANTHROPIC_KEY}"


def test_openai_reasoning_model_parameters() -> None:
    """gpt-5 models take max_completion_tokens and no temperature (which is then not in the cache key)."""
    with LlmServer() as srv:
        client = client_for(srv, "openai", model="gpt-5-mini", reasoning_effort="minimal")
        ask(client, "hi", max_tokens=64, temperature=0.7)
    body = srv.requests[0].body
    assert body["max_completion_tokens"] == 64 and body["reasoning_effort"] == "minimal"
    assert "max_tokens" not in body and "temperature" not in body
    key = [CacheKey.of(client.key_inputs("hi", max_tokens=64, temperature=t)) for t in (0.0, 0.7, None)]
    assert len({k.digest for k in key}) == 1


@pytest.mark.parametrize("api", APIS)
def test_reply_cut_at_the_token_limit_is_a_counted_failure(api: Api, tmp_path: Path) -> None:
    """finish_reason: length (OpenAI) / stop_reason: max_tokens (Anthropic): raised as TruncatedReply with the
    partial text and usage, counted and billed, never cached (a re-run asks again)."""
    from lorascope.llm.clients import TruncatedReply

    with LlmServer(lambda *_: Reply('{"explanation": "cut sh', cut=True)) as srv:
        client = CachedClient(client_for(srv, api), DiskCache(tmp_path))
        with pytest.raises(TruncatedReply) as raised:
            ask(client, "four words of prompt", max_tokens=7)
        assert raised.value.text == '{"explanation": "cut sh' and "(7; " in str(raised.value)
        reason = "finish_reason: length" if api == "openai" else "stop_reason: max_tokens"
        assert reason in str(raised.value) and "\n" not in str(raised.value)
        assert (client.truncated, client.requests, client.input_tokens, client.output_tokens) == (1, 1, 4, 3)
        with pytest.raises(TruncatedReply):
            ask(client, "four words of prompt", max_tokens=7)
        assert srv.count() == 2 and client.hits == 0 and not list(tmp_path.rglob("*.json"))


def test_empty_reply_is_an_error() -> None:
    with LlmServer(lambda *_: Reply("")) as srv, pytest.raises(LlmError, match="empty reply"):
        ask(client_for(srv, "openai"), "hi")


# ----------------------------------------------------------------------------------------- retries
def record_retry_delays(monkeypatch: pytest.MonkeyPatch, api: Api) -> list[float]:
    """The delays (seconds) the SDK chooses before each retry, recorded from its own delay function (no
    wall-clock measurement: a loaded machine must not fail the test)."""
    import importlib

    sdk = importlib.import_module(f"{api}._base_client")
    chosen: list[float] = []
    original = sdk.BaseClient._calculate_retry_timeout

    def recording(self, *args, **kwargs):  # noqa: ANN001, ANN202
        chosen.append(original(self, *args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(sdk.BaseClient, "_calculate_retry_timeout", recording)
    return chosen


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("status", [429, 500, 503])
def test_error_then_success_is_retried(api: Api, status: int, monkeypatch: pytest.MonkeyPatch) -> None:
    delays = record_retry_delays(monkeypatch, api)
    with LlmServer(lambda _, __, i: Reply.error(status) if i == 0 else Reply("fine")) as srv:
        completion = ask(client_for(srv, api), "hi")
    assert completion.text == "fine" and completion.retries == 1
    assert [r.headers["x-stainless-retry-count"] for r in srv.requests] == ["0", "1"]
    # retry-after-ms: 10 replaces the SDK's 0.375-0.5 s first backoff
    assert delays == [pytest.approx(0.01)]


@pytest.mark.parametrize("api", APIS)
def test_timeout_then_success_is_retried(api: Api) -> None:
    with LlmServer(lambda _, __, i: Reply("late", delay_s=2.0) if i == 0 else Reply("fine")) as srv:
        completion = ask(client_for(srv, api, timeout_s=0.5), "hi")
    assert completion.text == "fine" and completion.retries == 1
    assert srv.count() == 2


@pytest.mark.parametrize("api", APIS)
def test_exhausted_retries_are_recorded_by_run_all(api: Api) -> None:
    def responder(_: Api, prompt: str, __: int) -> Reply:
        return Reply.error(500) if prompt == "bad" else Reply(f"label for {prompt}")

    with LlmServer(responder) as srv:
        results = answer_all(client_for(srv, api, max_retries=2), ["one", "bad", "two"])
    assert [r.text for r in (results[0], results[2])] == ["label for one", "label for two"]
    error = results[1]
    assert isinstance(error, LlmError)
    assert str(error) == f"{api} {MODELS[api]}: HTTP 500: scripted HTTP 500 (after 2 retries)"
    assert srv.count("bad") == 3


@pytest.mark.parametrize("api", APIS)
def test_client_error_is_not_retried(api: Api) -> None:
    with (
        LlmServer(lambda *_: Reply("no such model\nat all", status=404)) as srv,
        pytest.raises(LlmError) as raised,
    ):
        ask(client_for(srv, api), "hi")
    assert str(raised.value) == f"{api} {MODELS[api]}: HTTP 404: no such model at all"
    assert srv.count() == 1


def test_unreachable_server_is_one_line() -> None:
    with LlmServer() as srv:
        url = srv.url
    with pytest.raises(LlmError, match=r"^openai gpt-4o-mini: cannot connect to .* \(after 0 retries\)$"):
        ask(make_client("openai", "gpt-4o-mini", base_url=f"{url}/v1", max_retries=0), "hi")


def test_one_client_serves_several_event_loops() -> None:
    with LlmServer() as srv:
        client = client_for(srv, "openai")
        assert [ask(client, p).text for p in ("a", "b")] == ["echo: a", "echo: b"]


# ------------------------------------------------------------------------------------------- cache
@pytest.mark.parametrize("api", APIS)
def test_cached_rerun_makes_no_requests(api: Api, tmp_path: Path) -> None:
    prompts = [f"feature {i}" for i in range(12)]
    with LlmServer() as srv:
        first = CachedClient(client_for(srv, api), DiskCache(tmp_path))
        answers = answer_all(first, prompts)
        assert (first.requests, first.hits, srv.count()) == (12, 0, 12)
        again = CachedClient(client_for(srv, api), DiskCache(tmp_path))
        cached = answer_all(again, prompts)
    assert (again.requests, again.hits, srv.count()) == (0, 12, 12)
    assert all(c.cached for c in cached) and not any(a.cached for a in answers)
    assert [c.text for c in cached] == [a.text for a in answers] == [f"echo: {p}" for p in prompts]
    assert [c.input_tokens for c in cached] == [a.input_tokens for a in answers]


def test_cache_key_covers_what_determines_the_answer() -> None:
    def digest(backend="openai", model="gpt-4o-mini", base_url=None, prompt="p", max_tokens=10, temp=0.0,
               schema=None, structured=True):  # fmt: skip
        client = make_client(backend, model, base_url=base_url, structured_output=structured)
        inputs = client.key_inputs(prompt, max_tokens=max_tokens, temperature=temp, schema=schema)
        return CacheKey.of(inputs).digest

    base = digest()
    assert digest() == base
    variants = [
        digest(model="gpt-4o"),
        digest(prompt="q"),
        digest(max_tokens=11),
        digest(temp=0.5),
        digest(temp=None),
        digest(base_url="http://localhost:8000/v1"),
        digest(backend="openai-compatible", base_url="http://localhost:8000/v1"),
        digest(backend="anthropic"),
        digest(schema=SCHEMA),
        digest(schema=JsonSchema("answer", {**SCHEMA.schema, "required": []})),
        digest(backend="anthropic", schema=SCHEMA),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert digest(schema=SCHEMA, structured=False) == base  # the schema is not sent, so not in the key


def test_api_keys_never_reach_the_cache(tmp_path: Path) -> None:
    with LlmServer() as srv:
        for api in APIS:
            answer_all(CachedClient(client_for(srv, api), DiskCache(tmp_path)), ["a", "b"])
    assert {r.headers["authorization"] for r in srv.requests} == {
        f"Bearer {OPENAI_KEY}",
        f"Bearer {ANTHROPIC_KEY}",
    }
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 4
    for path in files:
        text = path.read_text()
        assert OPENAI_KEY not in text and ANTHROPIC_KEY not in text
        assert path.parent.name == path.stem[:2] and json.loads(text)["request"]["params"]["messages"]


def test_unreadable_entry_is_asked_again_and_rewritten(tmp_path: Path) -> None:
    with LlmServer() as srv:
        cached = CachedClient(client_for(srv, "openai"), DiskCache(tmp_path))
        answer_all(cached, ["a"])
        (entry,) = tmp_path.rglob("*.json")
        entry.write_text(entry.read_text()[:20])  # as if written without the atomic rename
        assert answer_all(cached, ["a"])[0].text == "echo: a"
        assert (cached.requests, srv.count()) == (2, 2)
        assert json.loads(entry.read_text())["completion"]["text"] == "echo: a"


def test_concurrent_writers_of_one_key_leave_one_whole_entry(tmp_path: Path) -> None:
    with LlmServer(latency_s=0.05) as srv:
        answer_all(CachedClient(client_for(srv, "openai"), DiskCache(tmp_path)), ["same"] * 8, concurrency=8)
    (entry,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert json.loads(entry.read_text())["completion"]["text"] == "echo: same"


def test_cost_estimate() -> None:
    """List prices from genai-prices, snapshot names included, for the models the profiles use."""
    assert estimate_cost("gpt-5-mini-2025-08-07", 1_000_000, 1_000_000) == pytest.approx(2.25)
    assert estimate_cost("claude-opus-4-1-20250805", 2_000, 1_000) == pytest.approx(0.105)
    assert estimate_cost("gpt-5-mini", 1_000_000, 1_000_000, backend="openai") == pytest.approx(2.25)
    assert estimate_cost("claude-opus-4-1", 2_000, 1_000, backend="anthropic") == pytest.approx(0.105)
    assert estimate_cost("Qwen/Qwen2.5-7B-Instruct", 10, 10) is None


@pytest.mark.parametrize(
    ("model", "backend", "base_url", "reason"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", None, None, "genai-prices has no price for 'Qwen/Qwen2.5-7B-Instruct'"),
        ("claude-opus-4-1", "openai", None, "genai-prices has no price for 'claude-opus-4-1'"),
        ("gpt-5-mini", "openai-compatible", "http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("m", "openai-compatible", None, "without a base_url"),
        ("heuristic-baseline", "heuristic", None, "backend heuristic is not a priced API"),
    ],
)
def test_unpriced_is_null_with_a_reason(model: str, backend, base_url, reason: str) -> None:
    got = price(model, 10, 10, backend=backend, base_url=base_url)
    assert got.usd is None and reason in got.reason and "\n" not in got.reason


def test_cached_client_prices_its_backend(tmp_path: Path) -> None:
    """gpt-5-mini through the OpenAI backend is billed at OpenAI's price (a proxy base URL bills the same);
    the same name served by a self-hosted openai-compatible server has no list price, and says so."""
    with LlmServer() as srv:
        vendor = CachedClient(client_for(srv, "openai", model="gpt-5-mini"), DiskCache(tmp_path))
        local = CachedClient(
            make_client("openai-compatible", "gpt-5-mini", base_url=f"{srv.url}/v1"), DiskCache(tmp_path)
        )
        for client in (vendor, local):
            answer_all(client, ["four words of prompt"])
    assert (vendor.input_tokens, vendor.output_tokens) == (4, 5)  # "echo: four words of prompt"
    assert vendor.cost_usd() == pytest.approx(estimate_cost("gpt-5-mini", 4, 5, backend="openai"))
    assert vendor.cost_usd() > 0 and vendor.cost_note() is None
    assert local.cost_usd() is None and f"{srv.url}/v1" in local.cost_note()


# ----------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("backend", "env"), [("openai", "OPENAI_API_KEY"), ("anthropic", "ANTHROPIC_API_KEY")]
)
def test_missing_api_key_names_the_variable(backend, env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(env)
    with pytest.raises(LlmError) as raised:
        make_client(backend, "m")
    assert str(raised.value) == f"{env} is not set (needed by the {backend} backend)"


def test_openai_compatible_needs_a_base_url_but_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(LlmError, match="needs a base_url"):
        make_client("openai-compatible", "Qwen/Qwen2.5-7B-Instruct")
    with pytest.raises(LlmError, match="^LOCAL_KEY is not set"):
        make_client("openai-compatible", "m", base_url="http://x/v1", api_key_env="LOCAL_KEY")
    with LlmServer() as srv:
        ask(make_client("openai-compatible", "Qwen/Qwen2.5-7B-Instruct", base_url=f"{srv.url}/v1"), "hi")
    assert srv.requests[0].headers["authorization"] == "Bearer EMPTY"


# ------------------------------------------------------------------------------------- concurrency
def test_run_all_bounds_requests_in_flight() -> None:
    prompts = [f"p{i}" for i in range(12)]
    with LlmServer(latency_s=0.2) as srv:
        results = answer_all(client_for(srv, "openai"), prompts, concurrency=4)
    assert srv.max_in_flight == 4
    assert [r.text for r in results] == [f"echo: {p}" for p in prompts]


def test_run_all_keeps_order_and_records_each_failure() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep((10 - i) / 1000)
        if i % 3 == 0:
            raise ValueError(f"item {i}")
        return i * i

    results = asyncio.run(run_all(list(range(10)), fn, 3, "test"))
    assert [str(r) if isinstance(r, ValueError) else r for r in results] == [
        f"item {i}" if i % 3 == 0 else i * i for i in range(10)
    ]
    assert asyncio.run(run_all([], fn, 3, "empty")) == []


# ------------------------------------------------------------------------------- structured output
SCHEMA = JsonSchema(
    "answer",
    {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"],
     "additionalProperties": False},
)  # fmt: skip


def ask_for(client: Client, prompt: str, schema: JsonSchema | None = SCHEMA):
    return asyncio.run(client.complete(prompt, max_tokens=32, temperature=None, schema=schema))


@pytest.fixture
def no_repair(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything goes through json-repair."""
    import json_repair

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a reply went through json-repair")

    monkeypatch.setattr(json_repair, "loads", refuse)


@pytest.mark.parametrize("api", APIS)
def test_structured_output_is_requested_and_read_without_repair(api: Api, no_repair: None) -> None:
    """OpenAI: ``response_format`` json_schema (strict); Anthropic: the schema as the one tool, forced. The
    reply is marked structured and read with json.loads alone."""
    with LlmServer(lambda *_: Reply('{"label": "a \\"quoted\\" label"}')) as srv:
        completion = ask_for(client_for(srv, api), "label this")
    (request,) = srv.requests
    assert request.schema == SCHEMA.schema
    if api == "openai":
        assert request.body["response_format"] == {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": SCHEMA.schema, "strict": True},
        }
    else:
        assert request.body["tool_choice"] == {"type": "tool", "name": "answer"}
        assert [t["name"] for t in request.body["tools"]] == ["answer"]
    assert completion.structured
    assert parse_json(completion.text, repair=False) == {"label": 'a "quoted" label'}


def test_request_without_a_schema_is_free_text() -> None:
    with LlmServer() as srv:
        for api in APIS:
            assert not ask_for(client_for(srv, api), "hi", schema=None).structured
    assert all(r.schema is None and "tools" not in r.body for r in srv.requests)


def test_server_without_structured_output_goes_through_json_repair() -> None:
    """An openai-compatible server flagged ``structured_output=False`` is sent no schema; its free-text reply
    is mended by json-repair. Flagged True, the same server refuses the request (HTTP 400)."""
    reply = "Sure! ```json\n{'label': 'x',}\n```"
    with LlmServer(lambda *_: Reply(reply), structured_output=False) as srv:
        url = f"{srv.url}/v1"
        plain = ask_for(
            make_client("openai-compatible", "local", base_url=url, structured_output=False), "hi"
        )
        assert srv.requests[0].schema is None and "response_format" not in srv.requests[0].body
        assert not plain.structured and parse_json(plain.text, repair=True) == {"label": "x"}
        with pytest.raises(LlmError, match="HTTP 400: this server does not support response_format"):
            ask_for(make_client("openai-compatible", "local", base_url=url, max_retries=0), "hi")


def test_anthropic_reply_without_the_tool_call_is_free_text() -> None:
    """A server that ignores the forced tool answers in text: not structured, so it is read with repair."""
    with LlmServer(lambda *_: Reply("no tool here")) as srv:
        completion = ask_for(client_for(srv, "anthropic"), "hi")
    assert srv.requests[0].schema == SCHEMA.schema
    assert completion.text == "no tool here" and not completion.structured


@pytest.mark.parametrize("api", APIS)
def test_structured_flag_survives_the_cache(api: Api, tmp_path: Path) -> None:
    with LlmServer(lambda *_: Reply('{"label": "x"}')) as srv:
        first = ask_for(CachedClient(client_for(srv, api), DiskCache(tmp_path)), "hi")
        again = ask_for(CachedClient(client_for(srv, api), DiskCache(tmp_path)), "hi")
    assert srv.count() == 1 and again.cached and again.structured and first.text == again.text


# ------------------------------------------------------------------------------------- JSON repair
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"label": "x", "score": 2}', {"label": "x", "score": 2}),
        ('```json\n{"label": "x"}\n```', {"label": "x"}),
        ("```\n[1, 2]\n```", [1, 2]),
        ('Here\'s the answer:\n\n{"label": "it\'s [x]"}\n\nLet me know [if needed].', {"label": "it's [x]"}),
        ("Sure. ```json\n{'label': 'a \"b\"', 'n': 3}\n``` Done.", {"label": 'a "b"', "n": 3}),
        ("Here: {'label': 'x'} Let me know [if needed].", {"label": "x"}),
        ("See [note] and {'a': 1}", {"a": 1}),
        ("{'a': True, 'b': None, 'c': False}", {"a": True, "b": None, "c": False}),
        ('{"a": [1, 2,], "b": {"c": 1,},}', {"a": [1, 2], "b": {"c": 1}}),
        ("{\u201clabel\u201d: \u201csmart\u201d}", {"label": "smart"}),
        ('{"a": {"b": 1}', {"a": {"b": 1}}),  # json-repair closes what is open
    ],
)
def test_parse_json_repairs(text: str, expected: object) -> None:
    assert parse_json(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"a": 1} or maybe {"a": 2}', "2 JSON values"),
        ('```json\n{"a": 1}\n```\n```json\n[2]\n```', "2 JSON values"),
        ("{'a': 1} or maybe {'a': 2}", "several JSON objects"),  # json-repair alone would keep the last
        ("{\"a\": 1} or maybe {'a': 2}", "several JSON objects"),
        ("{'a': 1}\n{'b': 2}", "several JSON"),
        ("no JSON at all", "no JSON object or array"),
        ('"just a string"', "got a JSON str"),
    ],
)
def test_parse_json_refuses_to_guess(text: str, reason: str) -> None:
    with pytest.raises(JsonReplyError, match=reason):
        parse_json(text)


def test_structured_reply_is_never_repaired(no_repair: None) -> None:
    assert parse_json('{"a": [1]}', repair=False) == {"a": [1]}
    with pytest.raises(JsonReplyError, match=r"^structured reply is not valid JSON \(Expecting"):
        parse_json('```json\n{"a": 1}\n```', repair=False)


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_dicts = st.dictionaries(st.text(), scalars | st.lists(scalars, max_size=4), max_size=6)
prose = st.text(st.characters(blacklist_characters="{}[]"), max_size=40)
plain_text = st.text(st.characters(categories=("L", "N", "Zs"), exclude_characters="\x85\xa0"), max_size=20)


@settings(max_examples=200, deadline=None)
@given(
    value=json_dicts | st.lists(scalars, max_size=6), indent=st.sampled_from([None, 2]), ascii=st.booleans()
)
def test_valid_json_round_trips(value: object, indent: int | None, ascii: bool) -> None:
    assert parse_json(json.dumps(value, indent=indent, ensure_ascii=ascii)) == value
    assert parse_json(json.dumps(value, indent=indent, ensure_ascii=ascii), repair=False) == value


@settings(max_examples=200, deadline=None)
@given(value=json_dicts, before=prose, after=prose, fence=st.booleans())
def test_json_in_fences_and_prose(value: dict, before: str, after: str, fence: bool) -> None:
    body = json.dumps(value, indent=2)
    assert (
        parse_json(f"{before}\n```json\n{body}\n```\n{after}" if fence else f"{before}{body}{after}") == value
    )


@settings(max_examples=200, deadline=None)
@given(value=st.dictionaries(plain_text, plain_text | st.integers(), max_size=6))
def test_python_repr_parses(value: dict) -> None:
    """Python literals of plain text (json-repair's reading of reprs holding quotes, brackets or escapes
    inside their strings is best effort)."""
    assert parse_json(repr(value)) == value
