"""A fake W&B server on 127.0.0.1 for notebook tests: the GraphQL operations and file_stream of
docs/wandb.md, recording what each run received and any protocol violation (wrong auth,
history offsets with gaps or duplicates, rows without _step/_runtime/_timestamp, credentials sent
to upload URLs). The Rust tests in helpers/tests/wandb.rs have a stricter twin with fault injection."""
import base64
import json
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = "fa4e0123456789abcdef0123456789abcdef0123"


class FakeWandb:
    def __init__(self):
        self.runs = defaultdict(lambda: {"upserts": [], "history": [], "summary": None, "complete": None,
                                         "uploaded": [], "files": {}})
        self.violations = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def body(self):
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_PUT(self):
                data = self.body()
                with fake.lock:
                    if self.headers.get("Authorization"):
                        fake.violations.append(f"credentials sent to upload URL {self.path}")
                    _, _, run, name = self.path.split("/", 3)
                    fake.runs[run]["files"][name] = data
                self.reply(200, {})

            def do_POST(self):
                raw = self.body().decode()
                expected = "Basic " + base64.b64encode(f"api:{KEY}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    return self.reply(401, {"error": "unauthorized"})
                with fake.lock:
                    if KEY in raw:
                        fake.violations.append("the API key appeared in a request body")
                    req = json.loads(raw)
                    if self.path == "/graphql":
                        return self.reply(200, fake.graphql(req["operationName"], req["variables"], self.server))
                    run = fake.runs[self.path.split("/")[4]]
                    files = req.get("files", {})
                    if "wandb-history.jsonl" in files:
                        h = files["wandb-history.jsonl"]
                        if h["offset"] != len(run["history"]):
                            fake.violations.append(f"history offset {h['offset']} after {len(run['history'])} lines")
                        for line in h["content"]:
                            row = json.loads(line)  # Python's json reads NaN and Infinity, as W&B's server
                            if not all(k in row for k in ("_step", "_runtime", "_timestamp")):
                                fake.violations.append(f"row without _step/_runtime/_timestamp: {line}")
                            run["history"].append(row)
                    if "wandb-summary.json" in files:
                        run["summary"] = json.loads(files["wandb-summary.json"]["content"][0])
                    run["uploaded"] += req.get("uploaded", [])
                    if req.get("preempting") and run["complete"] is None:
                        run["preempting"] = True
                    if req.get("complete"):
                        run["complete"] = req.get("exitcode")
                self.reply(200, {})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def graphql(self, op, v, server):
        if op == "UpsertBucket":
            config = json.loads(v["config"])
            if not all(isinstance(x, dict) and "value" in x for x in config.values()):
                self.violations.append("config is not {key: {value: v}}")
            run = self.runs[v["name"]]
            run["upserts"].append({**v, "config": config})
            return {"data": {"upsertBucket": {"inserted": True, "bucket": {
                "id": "b", "name": v["name"], "historyLineCount": len(run["history"]),
                "project": {"id": "p", "name": v["project"], "entity": {"id": "e", "name": "fake-entity"}}}}}}
        if op == "RunResumeStatus":
            run = self.runs.get(v["name"])
            bucket = None
            if run and run["history"]:
                bucket = {"name": v["name"], "historyLineCount": len(run["history"]),
                          "summaryMetrics": json.dumps(run["summary"] or {})}
            return {"data": {"model": {"name": v["project"], "bucket": bucket}}}
        if op == "CreateRunFiles":
            return {"data": {"createRunFiles": {"runID": "r", "uploadHeaders": [], "files": [
                {"name": f, "uploadUrl": f"{self.url}/upload/{v['run']}/{f}"} for f in v["files"]]}}}
        return {"errors": [f"unknown operation {op}"]}

    def steps(self, run_id):
        return [r["_step"] for r in self.runs[run_id]["history"]]

    def close(self):
        self.server.shutdown()
