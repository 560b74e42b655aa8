"""A real local HTTP server speaking the OpenAI chat-completions and Anthropic messages APIs.

Tests and benchmarks point the official SDKs at it, so retries, timeouts, headers and concurrency are
exercised over real sockets. A responder ``(api, prompt, request_index) -> Reply`` scripts each answer
(text, an HTTP error, a delay); every request is recorded, and the peak number of requests in flight
is tracked, so tests can count and inspect what the clients actually sent.

Structured output is honoured as the real APIs do: an OpenAI request's ``response_format`` is recorded
and its reply is the scripted text (the test scripts schema-valid JSON, as a constrained decoder would
give); an Anthropic request that forces a tool (``tool_choice: {"type": "tool"}``) gets a ``tool_use``
block whose ``input`` is the scripted JSON object (scripted text that is no JSON object comes back as a
text block). ``LlmServer(structured_output=False)`` stands for a server without ``json_schema`` support:
it refuses a request carrying ``response_format`` or ``tools`` with HTTP 400.

``answer_detection`` answers the autointerp detection prompt from its content, as a careful reader
would: the numbers of the snippets that contain the token the explanation quotes. Tests score a correct
and a wrong explanation with it and know exactly what balanced accuracy each must get.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

Api = Literal["openai", "anthropic"]
_PATHS: dict[str, Api] = {"/v1/chat/completions": "openai", "/v1/messages": "anthropic"}


@dataclass(frozen=True)
class Reply:
    """What the server answers: ``text`` with status 200, or an error ``status``, after ``delay_s``.
    ``cut``: the reply stopped at the token limit (OpenAI ``finish_reason: length``, Anthropic
    ``stop_reason: max_tokens``) instead of ending on its own."""

    text: str = "ok"
    status: int = 200
    delay_s: float = 0.0
    headers: Mapping[str, str] = field(default_factory=dict)
    cut: bool = False

    @classmethod
    def error(cls, status: int, *, retry_after_ms: int | None = 10) -> Reply:
        """An HTTP error; ``retry-after-ms`` (which both SDKs prefer) keeps their retries fast.

        ``retry-after: 0`` is sent too, as a real rate limiter might; the SDKs ignore a zero delay and
        fall back to their exponential backoff (~0.5 s), which ``retry-after-ms`` avoids.
        """
        headers = {"retry-after": "0"}
        if retry_after_ms is not None:
            headers["retry-after-ms"] = str(retry_after_ms)
        return cls(text=f"scripted HTTP {status}", status=status, headers=headers)


@dataclass(frozen=True)
class Recorded:
    """One request as received (header names lower-cased)."""

    index: int
    api: Api
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def prompt(self) -> str:
        return self.body["messages"][-1]["content"]

    @property
    def forced_tool(self) -> str | None:
        """The tool an Anthropic request forces (``tool_choice: {"type": "tool", "name": ...}``)."""
        choice = self.body.get("tool_choice")
        return choice["name"] if isinstance(choice, dict) and choice.get("type") == "tool" else None

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema the request asks the reply to follow: OpenAI ``response_format`` ``json_schema``
        or the input schema of the tool an Anthropic request forces; None for a free-text request."""
        fmt = self.body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            return fmt["json_schema"]["schema"]
        for tool in self.body.get("tools", []):
            if tool.get("name") == self.forced_tool:
                return tool["input_schema"]
        return None


Responder = Callable[[Api, str, int], Reply]


def echo(api: Api, prompt: str, index: int) -> Reply:
    """The default responder: repeat the prompt."""
    return Reply(text=f"echo: {prompt}")


# The detection template shows the explanation quoted on its own line after "described as:", and one
# ``<number>. <snippet>`` line per snippet between <snippets> tags (newlines inside a snippet escaped).
_DESCRIBED = re.compile(r'described as:\n"(.*?)"\n', re.DOTALL)
_SNIPPETS = re.compile(r"^<snippets>\n(.*?)\n</snippets>$", re.DOTALL | re.MULTILINE)
_NUMBERED = re.compile(r"(\d+)\. (.*)")
_QUOTED = re.compile(r"'([^']+)'")


@dataclass(frozen=True)
class DetectionPrompt:
    """A detection prompt read back: the explanation, and each snippet under the number it is shown with."""

    explanation: str
    snippets: dict[int, str]

    @classmethod
    def read(cls, prompt: str) -> DetectionPrompt | None:
        """None for a prompt that is no detection prompt; ValueError for one whose lines are not numbered."""
        described, block = _DESCRIBED.search(prompt), _SNIPPETS.search(prompt)
        if described is None or block is None:
            return None
        snippets: dict[int, str] = {}
        for line in block.group(1).split("\n"):
            numbered = _NUMBERED.fullmatch(line)
            if numbered is None or int(numbered.group(1)) in snippets:
                raise ValueError(f"snippet line {line!r} is not '<new number>. <snippet>'")
            snippets[int(numbered.group(1))] = numbered.group(2)
        return cls(described.group(1), snippets)

    @property
    def token(self) -> str | None:
        """The first token the explanation quotes in single quotes (``fires on 'zebra'``), if any."""
        quoted = _QUOTED.search(self.explanation)
        return quoted.group(1) if quoted else None

    def containing(self, token: str | None) -> list[int]:
        """The shown numbers of the snippets that contain ``token`` (none for no token)."""
        return [n for n, text in self.snippets.items() if token is not None and token in text]


def answer_detection(prompt: str) -> Reply | None:
    """The detection reply a careful reader gives: ``{"matches": [...]}`` with the shown numbers of the
    snippets containing the explanation's quoted token. None for a prompt that is no detection prompt;
    HTTP 400 (not retried) for one whose snippet lines cannot be read."""
    try:
        read = DetectionPrompt.read(prompt)
    except ValueError as err:
        return Reply(f"unreadable detection prompt: {err}", status=400)
    return None if read is None else Reply(json.dumps({"matches": read.containing(read.token)}))


class LlmServer:
    """``with LlmServer(responder) as srv``: OpenAI base URL ``f"{srv.url}/v1"``, Anthropic ``srv.url``.

    ``latency_s`` delays every answer (requests are served concurrently, one thread each), standing in
    for a real API's response time in benchmarks.
    """

    def __init__(
        self, responder: Responder = echo, *, latency_s: float = 0.0, structured_output: bool = True
    ) -> None:
        self.responder = responder
        self.latency_s = latency_s
        self.structured_output = structured_output
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _handler(self))
        # A short poll interval: shutdown() waits for the serving loop's next poll (0.5 s by default).
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LlmServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # wakes handlers still sleeping out a delay
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def count(self, prompt: str | None = None) -> int:
        """Requests received so far (for ``prompt`` only, when given)."""
        with self._lock:
            return sum(1 for r in self.requests if prompt is None or r.prompt == prompt)

    def _begin(self, api: Api, path: str, headers: dict[str, str], body: dict[str, Any]) -> Recorded:
        with self._lock:
            record = Recorded(len(self.requests), api, path, headers, body)
            self.requests.append(record)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return record

    def _end(self) -> None:
        with self._lock:
            self.in_flight -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # the default backlog of 5 drops connections when many clients start at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that timed out and hung up
            super().handle_error(request, client_address)


def _handler(server: LlmServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDKs' connection pools expect
        timeout = 30  # an idle kept-alive connection's thread exits after this
        disable_nagle_algorithm = True  # else headers and body, sent apart, wait ~40 ms for a delayed ACK

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            api = _PATHS.get(self.path)
            if api is None:
                self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            record = server._begin(api, self.path, headers, body)
            try:
                if not server.structured_output and ("response_format" in body or "tools" in body):
                    unsupported = "response_format" if "response_format" in body else "tools"
                    reply = Reply(f"this server does not support {unsupported}", status=400)
                else:
                    reply = server.responder(api, record.prompt, record.index)
                server._stop.wait(server.latency_s + reply.delay_s)
                payload = _payload(api, body, record, reply)
            finally:
                server._end()  # before answering, so the client's next request never overlaps this one
            self._send(reply.status, payload, reply.headers)

        def _send(self, status: int, payload: dict[str, Any], headers: Mapping[str, str]) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except ConnectionError:
                self.close_connection = True

    return Handler


def _payload(api: Api, body: dict[str, Any], record: Recorded, reply: Reply) -> dict[str, Any]:
    """The API's JSON for ``reply``; usage counts words (prompt in, reply out)."""
    model = body.get("model", "unknown")
    n_in, n_out = len(record.prompt.split()), len(reply.text.split())
    if api == "openai":
        if reply.status != 200:
            return {"error": {"message": reply.text, "type": "server_error", "param": None, "code": None}}
        return {
            "id": f"chatcmpl-{time.monotonic_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text},
                    "finish_reason": "length" if reply.cut else "stop",
                }
            ],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
        }
    if reply.status != 200:
        return {"type": "error", "error": {"type": "api_error", "message": reply.text}}
    content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}]
    stop = "end_turn"
    if record.forced_tool is not None:
        try:
            tool_input = json.loads(reply.text)
        except ValueError:
            tool_input = None
        if isinstance(tool_input, dict):
            block = {"type": "tool_use", "id": f"toolu_{record.index}", "name": record.forced_tool}
            content, stop = [{**block, "input": tool_input}], "tool_use"
    return {
        "id": f"msg_{time.monotonic_ns()}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": "max_tokens" if reply.cut else stop,
        "stop_sequence": None,
        "usage": {"input_tokens": n_in, "output_tokens": n_out},
    }
