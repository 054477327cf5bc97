"""Debian's headless Chromium, driven over the Chrome DevTools Protocol, for tests that look at pages.

Each browser has its own profile directory (give it one under the test's tmp dir: nothing is written
elsewhere), reaches nothing but loopback (no other name resolves: a page cannot call out), and is
stopped by PID. HTTP basic auth is answered the way a person answers the browser's login prompt: on
the server's 401 challenge the browser asks, and `credentials` are given, or the prompt is cancelled.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import websocket

CHROMIUM = "/usr/bin/chromium"
START_TIMEOUT = 60.0


class BrowserError(RuntimeError):
    """Chromium did not start, or a DevTools call failed; the message says which."""


def unavailable_reason() -> str | None:
    """Why there is no browser to test with, or None."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"no {CHROMIUM}: install Debian's chromium (`make test` does, as root)"
    return None


class Chromium:
    """One headless Chromium with one page, and a DevTools connection to that page."""

    def __init__(self, profile: Path, credentials: tuple[str, str] | None = None) -> None:
        self.profile = profile
        #: Given at the basic-auth prompt; None cancels the prompt.
        self.credentials = credentials
        self.events: list[dict[str, Any]] = []
        self.process: subprocess.Popen[bytes] | None = None
        self._ws: websocket.WebSocket | None = None
        self._tmp: str | None = None
        self._ids = itertools.count(1)

    # -- lifecycle

    def start(self) -> Chromium:
        self.profile.mkdir(parents=True, exist_ok=True)
        argv = [
            CHROMIUM, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "--window-size=1280,900",
            # Nothing but the pages the test opens: no updates, sync, metrics or pings, and every
            # host name but loopback's unresolvable, so no page or feature reaches beyond this machine.
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
            "--disable-client-side-phishing-detection", "--no-pings", "--metrics-recording-only",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
            "about:blank",
        ]  # fmt: skip
        if os.geteuid() == 0:
            argv.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root
        # Its home, caches and crash reports go in the profile directory too. Its temporary files
        # (a socket among them, whose path must stay short) go in a directory of ours, removed at stop().
        self._tmp = tempfile.mkdtemp(prefix="koubou-chromium-")
        env = {**os.environ, "HOME": str(self.profile), "TMPDIR": self._tmp,
               "XDG_CONFIG_HOME": str(self.profile / "config"), "XDG_CACHE_HOME": str(self.profile / "cache")}  # fmt: skip
        try:
            with open(self.profile / "chromium.log", "wb") as log:
                self.process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
            self._connect()
        except BaseException:
            self.stop()
            raise
        return self

    def _connect(self) -> None:
        assert self.process is not None
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BrowserError(f"chromium did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            pages = [target for target in json.loads(response.read()) if target["type"] == "page"]
        if not pages:
            raise BrowserError("chromium has no page to drive")
        self._ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=10, suppress_origin=True)
        self.call("Page.enable")
        self.call("Network.enable")
        # Every request pauses here first, so that a 401 challenge reaches us as Fetch.authRequired.
        self.call("Fetch.enable", handleAuthRequests=True, patterns=[{"urlPattern": "*"}])

    def stop(self) -> None:
        """Close the connection, stop the browser's process group by its PID, remove its temporary files."""
        if self._ws is not None:
            self._ws.close()
            self._ws = None
        if self.process is not None:
            _stop_group(self.process)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> Chromium:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log(self) -> str:
        try:
            return (self.profile / "chromium.log").read_text(errors="replace")
        except OSError:
            return ""

    # -- the protocol

    def call(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events meanwhile are handled and kept)."""
        message_id = self._send(method, **params)
        answer = self._pump(lambda message: message.get("id") == message_id, timeout, f"{method} answer")
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        return dict(answer.get("result") or {})

    def _send(self, method: str, **params: Any) -> int:
        assert self._ws is not None, "start() the browser first"
        message_id = next(self._ids)
        self._ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        return message_id

    def _pump(self, wanted: Any, timeout: float, what: str) -> dict[str, Any]:
        assert self._ws is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"no {what} within {timeout}s")
            self._ws.settimeout(remaining)
            try:
                message = json.loads(self._ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            if "method" in message:
                self._on_event(message)
            if wanted(message):
                return message

    def _on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        params = event.get("params", {})
        if event["method"] == "Fetch.requestPaused":
            self._send("Fetch.continueRequest", requestId=params["requestId"])
        elif event["method"] == "Fetch.authRequired":
            if self.credentials is None:
                answer = {"response": "CancelAuth"}
            else:
                user, password = self.credentials
                answer = {"response": "ProvideCredentials", "username": user, "password": password}
            self._send("Fetch.continueWithAuth", requestId=params["requestId"], authChallengeResponse=answer)

    # -- what a test does

    def open(self, url: str, timeout: float = 30) -> int:
        """Load `url` in the page, wait for its load event, and return the document's HTTP status."""
        mark = len(self.events)
        navigation = self.call("Page.navigate", url=url)
        if navigation.get("errorText"):
            raise BrowserError(f"{url}: {navigation['errorText']}")
        loader = navigation.get("loaderId")

        def loaded(message: dict[str, Any]) -> bool:
            return message.get("method") == "Page.loadEventFired"

        if not any(loaded(event) for event in self.events[mark:]):
            self._pump(loaded, timeout, f"load event of {url}")
        statuses = [
            event["params"]["response"]["status"]
            for event in self.events[mark:]
            if event["method"] == "Network.responseReceived" and event["params"].get("loaderId") == loader
            and event["params"].get("type") == "Document"
        ]  # fmt: skip
        if not statuses:
            raise BrowserError(f"{url}: loaded, but no document response was seen")
        return int(statuses[-1])

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression!r} threw: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        """Poll a JavaScript expression until it is truthy (pages that render with JS); return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText.slice(0, 2000) : ''")
                raise AssertionError(f"{expression!r} still falsy after {timeout}s; the page shows:\n{text}")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it after a grace, and reap the leader."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)  # helper processes that outlived the browser
    except ProcessLookupError:
        pass
    process.wait(timeout=10)
