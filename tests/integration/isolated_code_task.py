"""One code task in an isolated environment, run by test_codex.py under `unshare`.

It starts the fake LLM server and runs koubou's Codex runner against it, then prints one JSON line:
the result or the error. `--offline` (inside `unshare -n`): it brings `lo` up first and, to see any
attempt to phone home, gives the resolver's address (from /etc/resolv.conf) to `lo` too and records
every DNS query sent there.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

from koubou.backends.base import Backend, BackendError
from koubou.backends.codex import CodexRunner, CodexSetup
from koubou.backends.ollama import OllamaBackend
from koubou.backends.openai import OpenAIBackend
from koubou.jobs import DelegationJob, ShippedFile
from tests.fakes.llm_server import FakeLLMServer

MODEL = "fake-coder:1b"


def _nameserver() -> str | None:
    for line in Path("/etc/resolv.conf").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver" and "." in fields[1]:
            return fields[1]
    return None


def _query_name(packet: bytes) -> str:
    labels, at = [], 12  # after the DNS header
    while at < len(packet) and packet[at]:
        length = packet[at]
        labels.append(packet[at + 1 : at + 1 + length].decode(errors="replace"))
        at += 1 + length
    return ".".join(labels)


def _catch_dns(address: str, seen: list[str]) -> None:
    # On lo itself: the namespace keeps no interface but loopback.
    subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True, capture_output=True, timeout=10)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 53))

    def serve() -> None:
        while True:
            packet, _ = sock.recvfrom(4096)
            seen.append(_query_name(packet))

    threading.Thread(target=serve, daemon=True).start()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--codex", required=True)
    parser.add_argument("--home", required=True)
    parser.add_argument("--kind", choices=("ollama", "openai"), required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--files", default="{}", help="JSON object: path -> content")
    parser.add_argument("--offline", action="store_true", help="in a network namespace of its own")
    args = parser.parse_args()
    looked_up: list[str] = []
    if args.offline:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True, timeout=10)
    interfaces = sorted(name for _, name in socket.if_nameindex())
    nameserver = _nameserver()
    if args.offline and nameserver:
        _catch_dns(nameserver, looked_up)
    home = Path(args.home)
    setup = CodexSetup(args.codex, home / "config" / "codex.toml", home / "run" / "codex", False, 4096)
    job = DelegationJob(
        task_id="task_offline", type="code", prompt=args.prompt, model=MODEL, timeout=120,
        files=tuple(ShippedFile(path=path, content=content) for path, content in json.loads(args.files).items()),
    )  # fmt: skip
    report: dict[str, object] = {"interfaces": interfaces}
    with FakeLLMServer(models=(MODEL,)) as fake:
        backend: Backend = OllamaBackend(fake.url) if args.kind == "ollama" else OpenAIBackend(f"{fake.url}/v1")
        try:
            result = CodexRunner(setup).run(backend, MODEL, job, 120)
            report.update(output=result.output, diff=result.extra.get("diff"))
        except BackendError as error:
            report.update(error=f"{type(error).__name__}: {error}")
        report["backend_calls"] = len(fake.responses_requests())
    report["dns_queries"] = looked_up
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
