"""A small OpenAI-compatible HTTP server for tests: answers chat completions with answer-token log-probs,
and misbehaves on request (HTTP 500, malformed bodies, slow answers) to test the client's fault handling.

The simulated feature is decided by the explanation in the prompt: an explanation containing ALWAYS
answers "1" with probability 0.9 (value digit 7), any other answers "1" with probability 0.1 (digit 2).
"""

import json
import math
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# A client that gave up (a timeout, a stopped test) closed its socket: writing the answer then fails, and
# that is expected, not an error worth a traceback on stderr.
CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
THREAD_PREFIX = "FakeOpenAIServer"  # every thread of the server is named so; tests/conftest.py looks for it
STOP_SECONDS = 10.0


class _Server(ThreadingHTTPServer):
    # server_close() joins the per-request threads (daemon ones too, on Python >= 3.10), so no handler,
    # slow or not, outlives stop() and writes into a later test's captured output
    daemon_threads = True
    block_on_close = True

    def process_request_thread(self, request, client_address):
        threading.current_thread().name = f"{THREAD_PREFIX}-request-{client_address[1]}"
        super().process_request_thread(request, client_address)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], CLIENT_GONE):  # socketserver prints a traceback here
            super().handle_error(request, client_address)


class FakeOpenAIServer:
    """Serves on 127.0.0.1 in a thread; `faults` is a list of what the next requests do instead of answering
    ('500', 'malformed', 'no_logprobs', 'slow')."""

    def __init__(self, slow_seconds: float = 2.0):
        self.faults: list[str] = []
        self.requests = 0
        self.lock = threading.Lock()
        self.slow_seconds = slow_seconds
        self.closing = threading.Event()  # set by stop(): wakes the 'slow' handlers at once
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                try:
                    self.end_headers()
                    self.wfile.write(body)
                except CLIENT_GONE:
                    pass

            def do_GET(self):
                self._send(200, json.dumps({"object": "list", "data": [{"id": "fake-sim", "object": "model",
                                                                        "created": 0, "owned_by": "test"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    fault = server.faults.pop(0) if server.faults else None
                if fault == "500":
                    return self._send(500, b'{"error": {"message": "boom"}}')
                if fault == "malformed":
                    return self._send(200, b"{not json")
                if fault == "slow":
                    server.closing.wait(server.slow_seconds)
                self._send(200, json.dumps(_answer(body, fault == "no_logprobs")).encode())

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name=f"{THREAD_PREFIX}-serve", daemon=True)
        self.stopped = False

    def __enter__(self) -> "FakeOpenAIServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving, wait for the serving thread and every request thread, close the socket; safe to
        call twice or on a server never started."""
        if self.stopped:
            return
        self.stopped = True
        self.closing.set()
        if self.thread.ident is not None:  # shutdown() waits for serve_forever: only once it was started
            self.httpd.shutdown()
            self.thread.join(STOP_SECONDS)
        self.httpd.server_close()


def _answer(body: dict, no_logprobs: bool) -> dict:
    user = body["messages"][-1]["content"]
    digits = "0 to 9" in body["messages"][0]["content"]
    active = "ALWAYS" in user
    if digits:
        probs = {"7": 0.8, "6": 0.2} if active else {"2": 0.8, "1": 0.2}
    else:
        probs = {"1": 0.9, "0": 0.1} if active else {"1": 0.1, " 0": 0.9}
    top = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in probs.items()]
    token = max(probs, key=probs.get)
    logprobs = None if no_logprobs else {"content": [{"token": token, "logprob": math.log(probs[token]),
                                                      "bytes": None, "top_logprobs": top}]}
    return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": token}, "finish_reason": "length",
                         "logprobs": logprobs}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
