"""A fake Hugging Face hub on 127.0.0.1 for notebook and command tests, speaking what hf-hub uses:
`GET /api/datasets/{owner}/{name}/revision/{rev}` (the file list), and
`GET /datasets/{owner}/{name}/resolve/{rev}/{file}` with `Range` (`bytes=0-0` for metadata: `ETag`,
`X-Repo-Commit`, `Content-Range`; then `bytes=N-` for the body). The Rust tests in
helpers/tests/common/mod.rs have a twin that also breaks transfers to test resuming."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, datasets: dict[str, dict[str, bytes]]):
        """datasets: {"owner/name": {"path/in/repo": bytes}}"""
        self.requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, code, body: bytes, headers=()):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?")[0]
                fake.requests.append((path, self.headers.get("Range"), self.headers.get("Authorization")))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
                    files = datasets.get(f"{parts[2]}/{parts[3]}")
                    if files is None:
                        return self.send(404, b"")
                    body = json.dumps({"sha": COMMIT, "siblings": [{"rfilename": f} for f in sorted(files)]}).encode()
                    return self.send(200, body, [("Content-Type", "application/json")])
                if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
                    data = datasets.get(f"{parts[1]}/{parts[2]}", {}).get("/".join(parts[5:]))
                    if data is None:
                        return self.send(404, b"")
                    rng = self.headers.get("Range", "bytes=0-")
                    start = int(rng.removeprefix("bytes=").split("-")[0] or 0)
                    end = 1 if rng == "bytes=0-0" else len(data)
                    chunk = data[start:end]
                    return self.send(206, chunk, [("Content-Range", f"bytes {start}-{end - 1}/{len(data)}"),
                                                  ("ETag", f'"{len(data):016x}{len(parts[-1])}"'), ("X-Repo-Commit", COMMIT)])
                self.send(404, b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
