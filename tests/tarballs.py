"""A REMOTE_URL server for tests: a checkpoint's tarball behind an ETag, on a real http.server."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
from pathlib import Path


class ETagServer(http.server.BaseHTTPRequestHandler):
    """Serves `body` at any path with an ETag of its sha256, answering 304 to a matching If-None-Match;
    records each request's If-None-Match and status (class attributes: one test at a time)."""

    body = b""
    seen: list[tuple[str | None, int]] = []

    def do_GET(self) -> None:  # noqa: N802
        etag = '"' + hashlib.sha256(self.body).hexdigest()[:20] + '"'
        asked = self.headers.get("If-None-Match")
        status = 304 if asked == etag else 200
        self.seen.append((asked, status))
        self.send_response(status)
        self.send_header("ETag", etag)
        if status == 200:
            self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        if status == 200:
            self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def tarball_bytes(src: Path, top: str = "mymodel") -> bytes:
    """A .tar.gz of the folder `src`, under the top folder `top`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(src, arcname=top)
    return buffer.getvalue()
