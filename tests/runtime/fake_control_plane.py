"""A small stdlib stand-in for the control plane's node-facing endpoints (enroll, heartbeat,
deploy files), to test the node side against an external peer it does not own. The end-to-end
tests run the same node code against the real Django control plane."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NODE_ID = "3f0c6a52-2d1b-4c7e-9a55-0d4c1f6b8e21"
NODE_SECRET = "node-secret-" + "s3cr3t" * 6  # the Bearer of heartbeats only
ACCESS_TOKEN = "access-token-" + "cust0mer" * 5  # the customer's token for the agent's API
ACCESS_TOKEN_SHA256 = hashlib.sha256(ACCESS_TOKEN.encode()).hexdigest()


class FakeControlPlane:
    """Records every request; answers as configured by the test (attributes may change while
    it runs)."""

    def __init__(self) -> None:
        self.heartbeats: list[dict[str, Any]] = []
        self.enrollments: list[dict[str, Any]] = []
        self.downloads: list[str] = []
        self.actions: list[dict] = []  # handed out with the next heartbeat reply
        self.heartbeat_status = 200
        self.heartbeat_seconds: float = 0.3
        self.reply_extra: dict[str, Any] = {}  # more keys for heartbeat replies
        self.enroll_status = 201
        self.enroll_raw: bytes | None = None  # a reply body to send instead of JSON
        self.files: dict[str, bytes] = {}  # GET path -> body
        self._lock = threading.Lock()
        plane = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                with plane._lock:
                    plane.downloads.append(self.path)
                body = plane.files.get(self.path)
                if body is None:
                    self._answer(404, {"error": "not found"})
                else:
                    self._send(200, "application/octet-stream", body)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                record = {"headers": dict(self.headers), "body": body, "at": time.monotonic()}
                if self.path == "/api/v1/enroll":
                    with plane._lock:
                        plane.enrollments.append(record)
                    if plane.enroll_raw is not None:
                        self._send(plane.enroll_status, "application/json", plane.enroll_raw)
                    elif plane.enroll_status == 201:
                        self._answer(
                            201,
                            {
                                "node_id": NODE_ID,
                                "node_secret": NODE_SECRET,
                                "access_token_sha256": ACCESS_TOKEN_SHA256,
                                "heartbeat_seconds": 7,
                                "control_plane_url": plane.url,
                            },
                        )
                    else:
                        self._answer(plane.enroll_status, {"error": "no such enrollment"})
                elif self.path == "/api/v1/agent/heartbeat":
                    with plane._lock:
                        plane.heartbeats.append(record)
                        status = plane.heartbeat_status
                        actions, plane.actions = (plane.actions, []) if status == 200 else ([], [])
                    if status != 200:
                        self._answer(status, {"error": f"status {status}"})
                    else:
                        reply = {
                            "state": "ready",
                            "heartbeat_seconds": plane.heartbeat_seconds,
                            "actions": actions,
                            **plane.reply_extra,
                        }
                        self._answer(200, reply)
                else:
                    self._answer(404, {"error": "not found"})

            def _answer(self, status: int, doc: Any) -> None:
                self._send(status, "application/json", json.dumps(doc).encode())

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeControlPlane:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def beats(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.heartbeats)

    def results(self) -> dict[str, dict]:
        """Every action result delivered so far, by action id."""
        return {r["action_id"]: r for hb in self.beats() for r in hb["body"]["results"]}


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
