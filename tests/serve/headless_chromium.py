"""A tiny Chrome DevTools Protocol client over headless Debian ``chromium``, for the /dashboard tests.

``HeadlessChromium.start(profile_dir)`` launches the browser on a free DevTools port (read back from
``DevToolsActivePort``) and connects to it; ``open_page(url)`` opens a tab with its own CDP session;
``close()`` ends the browser's whole process group. Everything is synchronous: events that arrive while
waiting for a command's answer are kept in ``events`` and read back per page.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from websockets.sync.client import ClientConnection, connect

BINARIES = ("chromium", "chromium-browser")
"""Names the browser is looked up under on PATH (Debian's package installs ``chromium``)."""


class CdpError(RuntimeError):
    """A DevTools command answered with an error, or a page threw during ``Runtime.evaluate``."""


def find_chromium() -> str | None:
    """The path of a chromium binary on PATH, or None."""
    return next((path for name in BINARIES if (path := shutil.which(name))), None)


@dataclass
class Event:
    session_id: str | None
    method: str
    params: dict


@dataclass
class HeadlessChromium:
    process: subprocess.Popen
    connection: ClientConnection
    log_path: Path
    events: list[Event] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def start(cls, binary: str, profile_dir: Path, timeout_s: float = 30.0) -> HeadlessChromium:
        """Launch ``binary`` headless with a fresh profile in ``profile_dir`` and connect to its browser target."""
        log_path = profile_dir / "chromium.log"
        args = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-port=0",
                f"--user-data-dir={profile_dir}", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "about:blank"]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # its own process group, ended whole by close()
        try:
            port_file = profile_dir / "DevToolsActivePort"
            deadline = time.monotonic() + timeout_s
            while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not open its DevTools port (exit code {process.poll()}); "
                                       f"its log:\n{log_path.read_text(errors='replace')[-3000:]}")
                time.sleep(0.05)
            port, path = port_file.read_text().splitlines()[:2]
            connection = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=timeout_s).__enter__()
        except BaseException:
            _end_process_group(process)
            raise
        return cls(process=process, connection=connection, log_path=log_path)

    def call(self, method: str, params: dict | None = None, session_id: str | None = None,
             timeout_s: float = 20.0) -> dict:
        """Send one command and return its result, keeping the events that arrive meanwhile."""
        message_id = next(self._ids)
        message: dict = {"id": message_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        self.connection.send(json.dumps(message))
        deadline = time.monotonic() + timeout_s
        while True:
            reply = json.loads(self.connection.recv(timeout=max(0.01, deadline - time.monotonic())))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise CdpError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(Event(reply.get("sessionId"), reply["method"], reply.get("params", {})))

    def open_page(self, url: str, width: int = 1280, height: int = 900) -> Page:
        """A new tab of ``width`` x ``height`` CSS pixels (scale 1) that has loaded ``url``."""
        target_id = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session_id = self.call("Target.attachToTarget", {"targetId": target_id, "flatten": True})["sessionId"]
        page = Page(self, target_id, session_id)
        for domain in ("Page", "Runtime", "Log"):
            page.call(f"{domain}.enable")
        page.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        page.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + 20
        while True:  # until the new document has loaded (evaluating may fail while the old one goes away)
            try:
                if page.evaluate(f"location.href === {json.dumps(url)} && document.readyState === 'complete'"):
                    return page
            except CdpError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load within 20 s")
            time.sleep(0.05)

    def close(self) -> None:
        """Close the connection and end the browser's process group (TERM, then KILL after 5 s)."""
        try:
            self.connection.close()
        finally:
            _end_process_group(self.process)


@dataclass
class Page:
    browser: HeadlessChromium
    target_id: str
    session_id: str

    def close(self) -> None:
        self.browser.call("Target.closeTarget", {"targetId": self.target_id})

    def call(self, method: str, params: dict | None = None) -> dict:
        return self.browser.call(method, params, session_id=self.session_id)

    def events(self, method: str) -> list[dict]:
        return [e.params for e in self.browser.events if e.session_id == self.session_id and e.method == method]

    def evaluate(self, expression: str):
        """The value of a JS expression (awaited if it is a promise), as JSON data."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {_describe_exception(result['exceptionDetails'])}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 10.0, poll_s: float = 0.1):
        """Evaluate ``expression`` until it is truthy and return that value; fail with the last value after
        ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{expression!r} still {value!r} after {timeout_s} s")
            time.sleep(poll_s)
        return value

    def script_errors(self) -> list[str]:
        """Uncaught exceptions and console.error/console.assert messages of the page so far."""
        self.evaluate("0")
        errors = [_describe_exception(e["exceptionDetails"]) for e in self.events("Runtime.exceptionThrown")]
        for call in self.events("Runtime.consoleAPICalled"):
            if call["type"] in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in call["args"]))
        return errors

    def log_errors(self) -> list[str]:
        """The browser's own error log entries for the page (failed loads, blocked resources, ...)."""
        self.evaluate("0")
        return [f"{e['entry']['text']} ({e['entry'].get('url', '')})" for e in self.events("Log.entryAdded")
                if e["entry"]["level"] == "error"]

    def screenshot(self, path: Path) -> bytes:
        """Save a PNG of the viewport to ``path`` and return its bytes."""
        png = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)
        return png


def _describe_exception(details: dict) -> str:
    exception = details.get("exception") or {}
    return exception.get("description") or details.get("text", "unknown exception")


def _end_process_group(process: subprocess.Popen) -> None:
    """End the process group that ``process`` leads (chromium's launcher, browser, renderers, helpers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):  # KILL also takes whatever of the group outlived the browser
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
