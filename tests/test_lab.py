"""`bash setup.sh lab` serves the experiment notebooks with the project's Rust kernel."""
import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import websocket  # websocket-client, a dependency of jupyter_server

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "moe-test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(port: int, path: str, method: str = "GET", body: dict | None = None):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        raw = r.read()
        return r.status, (json.loads(raw) if raw and r.headers.get_content_type() == "application/json" else raw)


def execute_over_websocket(port: int, kernel_id: str, code: str, timeout: float) -> str:
    """Sends one execute_request on the kernel's websocket; returns its stream output."""
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels?token={TOKEN}", timeout=timeout)
    msg_id, text = uuid.uuid4().hex, []
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                   "msg_type": "execute_request", "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }))
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            m = json.loads(ws.recv())
            if m.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if m["msg_type"] == "stream":
                text.append(m["content"]["text"])
            elif m["msg_type"] == "error":
                raise AssertionError(f"cell failed: {m['content']}")
            elif m["msg_type"] == "execute_reply":
                assert m["content"]["status"] == "ok", m["content"]
            elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                time.sleep(0.5)  # evcxr forwards output from another thread; let it arrive
                ws.settimeout(2)
                try:
                    while True:
                        m = json.loads(ws.recv())
                        if m["msg_type"] == "stream" and m.get("parent_header", {}).get("msg_id") == msg_id:
                            text.append(m["content"]["text"])
                except websocket.WebSocketTimeoutException:
                    pass
                return "".join(text)
        raise AssertionError("timed out waiting for the kernel")
    finally:
        ws.close()


def test_jupyterlab_starts_the_rust_kernel_for_the_notebook(tmp_path):
    port = free_port()
    lab = subprocess.Popen(
        [str(Path(sys.executable).parent / "jupyter-lab"), "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={ROOT}", "--allow-root"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "lab.log", "w"),
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                status, specs = api(port, "/api/kernelspecs")
                break
            except OSError:
                assert lab.poll() is None and time.time() < deadline, (tmp_path / "lab.log").read_text()[-2000:]
                time.sleep(0.5)
        rust = specs["kernelspecs"]["rust"]["spec"]
        assert rust["env"]["LIBTORCH_USE_PYTORCH"] == "1"
        assert rust["env"]["LD_LIBRARY_PATH"].endswith("torch/lib")
        assert "evcxr-kernel.sh" in " ".join(rust["argv"])

        status, nb = api(port, "/api/contents/experiments/base-olmoe/experiment.ipynb")
        assert status == 200 and nb["type"] == "notebook"
        assert nb["content"]["metadata"]["kernelspec"]["name"] == "rust"
        assert api(port, "/lab")[0] == 200

        # Saving it as JupyterLab does (the kernelspec filled in from the installed kernel, then a
        # PUT of the whole model) leaves the tracked file as it was: opening a notebook does not
        # dirty git.
        path = ROOT / "experiments/base-olmoe/experiment.ipynb"
        committed = path.read_bytes()
        content = nb["content"]
        content["metadata"]["kernelspec"] = {"name": "rust", "display_name": specs["kernelspecs"]["rust"]["spec"]["display_name"],
                                             "language": "rust"}
        try:
            status, _ = api(port, "/api/contents/experiments/base-olmoe/experiment.ipynb", "PUT",
                            {"type": "notebook", "format": "json", "content": content})
            assert status == 200
            diff = subprocess.run(["git", "diff", "--stat", "--", str(path)], cwd=ROOT, capture_output=True, text=True)
            assert path.read_bytes() == committed, f"saving through JupyterLab changed the notebook: {diff.stdout}"
        finally:
            path.write_bytes(committed)

        # Start the kernel the notebook asks for and run its first cell through the server's
        # websocket, as the browser does: dependencies load and libtorch_cuda is in the kernel.
        # A session, as the browser opens it: the kernel runs in the notebook's folder.
        status, session = api(port, "/api/sessions", "POST", {
            "path": "experiments/base-olmoe/experiment.ipynb", "name": "experiment.ipynb",
            "type": "notebook", "kernel": {"name": "rust"}})
        assert status == 201
        kernel = session["kernel"]
        first_cell = "".join(nb["content"]["cells"][2]["source"])
        assert first_cell.startswith(":dep tch")
        out = execute_over_websocket(port, kernel["id"], first_cell, timeout=600)
        assert "runtime: device cpu" in out
        if (Path(rust["env"]["LD_LIBRARY_PATH"]) / "libtorch_cuda.so").exists():
            assert "CUDA library loaded" in out
        api(port, f"/api/sessions/{session['id']}", "DELETE")
    finally:
        lab.terminate()
        lab.wait(timeout=30)
