"""A local stand-in for the OpenAI and Anthropic APIs (stdlib only), answering with known usage.

The official clients talk to it exactly as to the real APIs: chat completions (streaming and
not) and the messages API (streaming and not). A request whose model is `FAIL_MODEL` is answered
with an HTTP 400 error, the shape each API uses, so the client raises its own exception.

`USAGE` is what each call reports; `tests/e2e/llm_clients.rs` bills it from the providers'
published prices and compares with what llmtail counted.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAIL_MODEL = "gpt-4o-fails"
FAIL_CLAUDE = "claude-sonnet-4-5-fails"

# Usage each endpoint reports, in the API's own shape.
USAGE = {
    # OpenAI: prompt_tokens includes the cached ones; completion_tokens the reasoning ones.
    "openai": {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1000, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 100, "audio_tokens": 0},
    },
    "openai_stream": {
        "prompt_tokens": 800,
        "completion_tokens": 200,
        "total_tokens": 1000,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
    # Anthropic: input_tokens excludes the cache reads and writes.
    "anthropic": {
        "input_tokens": 200,
        "cache_read_input_tokens": 1000,
        "cache_creation_input_tokens": 500,
        "output_tokens": 300,
    },
    "anthropic_stream": {
        "input_tokens": 100,
        "cache_read_input_tokens": 2000,
        "cache_creation_input_tokens": 0,
        "output_tokens": 150,
    },
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        if status >= 400:
            # The clients must not retry: one failed call is one failed call.
            self.send_header("x-should-retry", "false")
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, events: list[tuple[str | None, dict | str]]) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.end_headers()
        for name, data in events:
            chunk = ""
            if name:
                chunk += f"event: {name}\n"
            chunk += "data: " + (data if isinstance(data, str) else json.dumps(data)) + "\n\n"
            self.wfile.write(chunk.encode())
            self.wfile.flush()
        self.close_connection = True

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        path = self.path.split("?")[0]
        if path.endswith("/chat/completions"):
            self.chat(body)
        elif path.endswith("/messages"):
            self.messages(body)
        else:
            self._json(404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}})

    def chat(self, body: dict) -> None:
        model = body.get("model", "")
        if model == FAIL_MODEL:
            self._json(
                400,
                {
                    "error": {
                        "message": "This model's maximum context length is exceeded.",
                        "type": "invalid_request_error",
                        "param": "messages",
                        "code": "context_length_exceeded",
                    }
                },
            )
            return
        created = int(time.time())
        message = "The capital of France is Paris."
        if not body.get("stream"):
            self._json(
                200,
                {
                    "id": "chatcmpl-fake1",
                    "object": "chat.completion",
                    "created": created,
                    "model": model + "-2024-08-06",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": message, "refusal": None},
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": USAGE["openai"],
                    "system_fingerprint": "fp_fake",
                },
            )
            return
        base = {
            "id": "chatcmpl-fake2",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model + "-2024-08-06",
            "system_fingerprint": "fp_fake",
        }
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        events: list[tuple[str | None, dict | str]] = []
        words = message.split(" ")
        for i, word in enumerate(words):
            delta = {"content": word + (" " if i + 1 < len(words) else "")}
            if i == 0:
                delta["role"] = "assistant"
            chunk = dict(base, choices=[{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])
            if include_usage:
                chunk["usage"] = None
            events.append((None, chunk))
        last = dict(base, choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
        if include_usage:
            last["usage"] = None
        events.append((None, last))
        if include_usage:
            events.append((None, dict(base, choices=[], usage=USAGE["openai_stream"])))
        events.append((None, "[DONE]"))
        self._sse(events)

    def messages(self, body: dict) -> None:
        model = body.get("model", "")
        if model == FAIL_CLAUDE:
            self._json(
                400,
                {
                    "type": "error",
                    "error": {"type": "invalid_request_error", "message": "prompt is too long"},
                },
            )
            return
        text = "The capital of France is Paris."
        if not body.get("stream"):
            self._json(
                200,
                {
                    "id": "msg_fake1",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": USAGE["anthropic"],
                },
            )
            return
        u = USAGE["anthropic_stream"]
        start_usage = dict(u, output_tokens=1)
        self._sse(
            [
                (
                    "message_start",
                    {
                        "type": "message_start",
                        "message": {
                            "id": "msg_fake2",
                            "type": "message",
                            "role": "assistant",
                            "model": model,
                            "content": [],
                            "stop_reason": None,
                            "stop_sequence": None,
                            "usage": start_usage,
                        },
                    },
                ),
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                ),
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
                ),
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                (
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                        "usage": {"output_tokens": u["output_tokens"]},
                    },
                ),
                ("message_stop", {"type": "message_stop"}),
            ]
        )


def start() -> str:
    """Serves on 127.0.0.1 (a free port) from a daemon thread; returns the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


if __name__ == "__main__":
    # Serves until stdin closes: prints the base URL on one line.
    import sys

    print(start(), flush=True)
    sys.stdin.read()
