"""Headless Chromium driven over the DevTools protocol (a websocket, via aiohttp), to look at
a page as a user's browser draws it: what the console said, where an element is, and
screenshots. Debian's `chromium` package; `.ci/run` installs it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--mute-audio", "--remote-debugging-port=0",
]  # fmt: skip


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Page:
    ws: aiohttp.ClientWebSocketResponse
    events: list[dict[str, Any]] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self._ids)
        await self.ws.send_str(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = await self.ws.receive(timeout=30)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"devtools connection closed: {msg}")
            data: dict[str, Any] = json.loads(msg.data)
            if data.get("id") == n:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                result: dict[str, Any] = data.get("result", {})
                return result
            self.events.append(data)

    async def wait_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while True:
            for e in self.events[seen:]:
                if e.get("method") == method:
                    return e
            seen = len(self.events)
            msg = await self.ws.receive(timeout=max(0.1, deadline - time.monotonic()))
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"devtools connection closed: {msg}")
            self.events.append(json.loads(msg.data))

    async def evaluate(self, expression: str) -> Any:
        reply = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"evaluate: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def screenshot(self, path: Path, clip: dict[str, float] | None = None) -> Path:
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": True}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        else:
            size = (await self.send("Page.getLayoutMetrics"))["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"],
                              "height": size["height"], "scale": 1}  # fmt: skip
        data = (await self.send("Page.captureScreenshot", **params))["data"]
        await asyncio.to_thread(path.write_bytes, base64.b64decode(data))
        return path

    def console_errors(self) -> list[str]:
        """Errors the page's console showed: console.error/assert, uncaught exceptions, and
        browser log entries at error level (failed loads, CSP violations...)."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            match e.get("method"):
                case "Runtime.consoleAPICalled" if p.get("type") in ("error", "assert"):
                    out.append(
                        " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
                    )
                case "Runtime.exceptionThrown":
                    d = p["exceptionDetails"]
                    out.append(d.get("exception", {}).get("description") or d.get("text", ""))
                case "Log.entryAdded" if p["entry"].get("level") == "error":
                    out.append(p["entry"].get("text", ""))
                case _:
                    pass
        return out


@contextlib.asynccontextmanager
async def open_page(url: str, width: int = 1280, height: int = 900) -> AsyncIterator[Page]:
    """A fresh Chromium (own profile directory) showing `url` after its load event."""
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("chromium: not installed")
    # Chromium's helper processes may still write to the profile as it is removed.
    with tempfile.TemporaryDirectory(
        prefix="chromium-profile-", ignore_cleanup_errors=True
    ) as profile:
        proc = await asyncio.create_subprocess_exec(
            binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
            "about:blank", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            port = await _devtools_port(Path(profile) / "DevToolsActivePort", proc)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                    targets = await r.json()
                target = next(t for t in targets if t["type"] == "page")
                async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    page = Page(ws)
                    for domain in ("Page", "Runtime", "Log"):
                        await page.send(f"{domain}.enable")
                    await page.send(
                        "Emulation.setDeviceMetricsOverride",
                        width=width, height=height, deviceScaleFactor=1, mobile=False,
                    )  # fmt: skip
                    await page.send("Page.navigate", url=url)
                    await page.wait_event("Page.loadEventFired")
                    yield page
        finally:
            if proc.returncode is None:
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _read_port(path: Path) -> int | None:
    if not path.exists():
        return None
    first = path.read_text().split("\n", 1)[0].strip()
    return int(first) if first.isdigit() else None


async def _devtools_port(path: Path, proc: asyncio.subprocess.Process) -> int:
    """Chromium writes the port it chose to DevToolsActivePort in its profile directory."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        port = await asyncio.to_thread(_read_port, path)
        if port is not None:
            return port
        await asyncio.sleep(0.05)
    raise TimeoutError("chromium did not open its DevTools port within 30 s")
