"""Start a real ComfyUI server with this pack and talk to it over HTTP (used by the demo and the tests).

``ComfyServer(base_dir)`` runs ``main.py`` from the ComfyUI folder that get_comfyui.py
provides, with ``--base-directory base_dir`` (models/, input/, output/, custom_nodes/ under
it), the pack linked into ``base_dir/custom_nodes``. ``run(prompt)`` queues an API-format
prompt and waits for its history entry.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .get_comfyui import ROOT, comfyui_dir

PACK_NAME = "comfyui-withanyone"
logger = logging.getLogger("comfy_server")


class PromptRejected(RuntimeError):
    """ComfyUI refused a prompt, or some of its outputs, at validation; ``details`` is its JSON answer."""

    def __init__(self, details: dict):
        self.details = details
        super().__init__(format_rejection(details))


def format_rejection(details: dict) -> str:
    lines = [details.get("error", {}).get("message", "prompt rejected")]
    for node_id, node in details.get("node_errors", {}).items():
        for err in node.get("errors", []):
            lines.append(f"  node {node_id} ({node.get('class_type')}): {err.get('message')}: {err.get('details')}")
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_pack(custom_nodes: Path) -> Path:
    """Link this repository into a ``custom_nodes`` folder (once); returns the link."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_NAME
    if link.exists() or link.is_symlink():  # is_symlink: a dangling link is still in the way
        if link.resolve() != ROOT:
            raise SystemExit(f"{link} exists and is not this checkout ({ROOT}); move it away or set COMFYUI_DIR")
        return link
    link.symlink_to(ROOT, target_is_directory=True)
    logger.info("installed the pack: %s -> %s", link, ROOT)
    return link


class ComfyServer:
    def __init__(
        self,
        base_dir: Path,
        comfy_dir: Path | None = None,
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 240,
        log_path: Path | None = None,
    ):
        self.base_dir = Path(base_dir)
        self.comfy_dir = comfy_dir or comfyui_dir()
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.log_path = Path(log_path) if log_path else self.base_dir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.url = ""

    @classmethod
    def connect(cls, url: str) -> ComfyServer:
        """A handle on a ComfyUI that is already running at ``url``: nothing is started or stopped."""
        server = cls(Path("."), comfy_dir=Path("."))
        server.url = url.rstrip("/")
        return server

    def __enter__(self) -> ComfyServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def start(self) -> None:
        install_pack(self.base_dir / "custom_nodes")
        port = free_port()
        args = [
            sys.executable,
            "main.py",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-auto-launch",
            "--base-directory",
            str(self.base_dir),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-api-nodes",
            *self.extra_args,
        ]
        import torch

        if not torch.cuda.is_available() and "--cpu" not in args:
            args.append("--cpu")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            args,
            cwd=self.comfy_dir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("ComfyUI exited during start-up:\n" + self.log_tail())
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("ComfyUI did not start in time:\n" + self.log_tail())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def get_json(self, path: str):
        return json.load(urllib.request.urlopen(self.url + path, timeout=60))

    def upload_image(self, path: Path, name: str, subfolder: str = "") -> str:
        """Upload an image into the server's input folder (overwriting); returns the value LoadImage takes."""
        boundary = f"withanyone{time.time_ns()}"
        parts = []
        for field, value in (("subfolder", subfolder), ("overwrite", "true"), ("type", "input")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode())
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + Path(path).read_bytes()
            + b"\r\n"
        )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        req = urllib.request.Request(
            self.url + "/upload/image", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        answer = json.load(urllib.request.urlopen(req, timeout=60))
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def download_image(self, image: dict) -> bytes:
        """The bytes of an image a prompt's history lists (``{filename, subfolder, type}``)."""
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        return urllib.request.urlopen(f"{self.url}/view?{query}", timeout=60).read()

    def queue(self, prompt: dict) -> str:
        body = json.dumps({"prompt": prompt, "client_id": "withanyone"}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            answer = json.load(urllib.request.urlopen(req, timeout=60))
        except urllib.error.HTTPError as err:
            if err.code == 400:
                raise PromptRejected(json.loads(err.read())) from None
            raise
        if answer.get("node_errors"):
            # ComfyUI still queues the outputs that validated; a partial run is not what was asked for
            self.wait(answer["prompt_id"])
            raise PromptRejected(
                {
                    "error": {"message": "some outputs failed validation (the rest ran)"},
                    "node_errors": answer["node_errors"],
                }
            )
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError("ComfyUI exited while running the prompt:\n" + self.log_tail())
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt), timeout)


def execution_error(history_entry: dict) -> str | None:
    """The node error message of a finished prompt, or None when it succeeded."""
    for kind, data in history_entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_message')}"
    return None
