"""A stand-in Label Studio for the tests: an HTTP server in a thread serving the captured project's uploads and
export (tests/data/label_studio_backend) for its API key only, and recording every request it receives."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from agmm_deploy.labels.label_studio import image_name

DATA = Path(__file__).resolve().parent / "data" / "label_studio_backend"
API_KEY = "test-key"
# The captured project's id; any other project id answers with the same tasks, none annotated yet.
PROJECT = json.loads((DATA / "export.json").read_text())[0]["project"]


class Recorder(ThreadingHTTPServer):
    """An HTTP server in a thread recording each request's path and Authorization header."""

    def __init__(self, answer):
        self.requests: list[tuple[str, str | None]] = []
        self.answer = answer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(handler):
                self.requests.append((handler.path, handler.headers.get("Authorization")))
                status, body = self.answer(handler.path, handler.headers.get("Authorization"))
                handler.send_response(status)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def label_studio_answer(path: str, auth: str | None) -> tuple[int, bytes]:
    """Uploads and project exports (see PROJECT), for API_KEY only."""
    if auth != f"Token {API_KEY}":
        return 401, b'{"detail": "Authentication credentials were not provided."}'
    if path.startswith("/data/upload/"):
        file = DATA / "images" / image_name(path)
        return (200, file.read_bytes()) if file.is_file() else (404, b"")
    if path.startswith(f"/api/projects/{PROJECT}/export"):
        return 200, (DATA / "export.json").read_bytes()
    if path.startswith("/api/projects/"):
        tasks = json.loads((DATA / "export.json").read_text())
        return 200, json.dumps([{**task, "annotations": []} for task in tasks]).encode()
    return 404, b""
