"""Browser fixtures: Debian's headless Chromium through its chromedriver (Selenium), and the
agent panel served in-process against the real tokenizer, the IVR and the Twilio simulator.

Nothing is downloaded at run time: the browser is /usr/bin/chromium, the driver
/usr/bin/chromedriver (`make test` installs both with apt-get when they are missing).
`VAULTLINE_SKIP_BROWSER=1` skips these tests, saying so; without it a missing browser fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.ivr.conftest import PUBLIC, IvrEnv, make_ivr  # noqa: F401 - the fixture
from vaultline.ivr.connector import ConnectorCredentials
from vaultline.panel.app import PanelConfig, RunningPanel, start_panel
from vaultline.panel.links import sign_link
from vaultline.twilio_sim.payments import ConnectorConfig

CHROMIUM = Path(os.environ.get("VAULTLINE_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("VAULTLINE_CHROMEDRIVER", "/usr/bin/chromedriver"))
ARTIFACTS = Path(__file__).resolve().parents[2] / ".artifacts" / "panel"
CREDENTIALS = ConnectorCredentials("twilio", "connector-password-for-the-panel")

@pytest.fixture(scope="session")
def chromium() -> tuple[Path, Path]:
    if os.environ.get("VAULTLINE_SKIP_BROWSER") == "1":
        pytest.skip("VAULTLINE_SKIP_BROWSER=1: the agent panel's browser tests are skipped")
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: install Debian's chromium and "
                    "chromium-driver (`make test` does it with apt-get), or set "
                    "VAULTLINE_SKIP_BROWSER=1 to skip the browser tests")
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture
def browser(chromium: tuple[Path, Path], tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = str(binary)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1024,900", f"--user-data-dir={tmp_path / 'profile'}",
                "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    # Every network event (responses, event-stream messages) for the leak checks.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(driver_path)),
                              options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@dataclass
class PanelEnv:
    ivr: IvrEnv
    panel: RunningPanel
    secret: bytes
    channel: Any

    def link(self, call_sid: str, agent: str = "agent-7", tenant: str = "default",
             ttl: int = 120) -> str:
        query = sign_link(self.secret, call_sid, agent, tenant, int(time.time()) + ttl)
        return f"{self.panel.url}/panel?{query}"


@pytest_asyncio.fixture
async def panel_env(make_ivr: Callable[..., Any],  # noqa: F811 - the imported fixture
                    tokenizer: Any) -> AsyncIterator[PanelEnv]:
    ivr = await make_ivr(connector_credentials=CREDENTIALS)
    ivr.sim.payments.connectors["vaultline"] = ConnectorConfig(
        PUBLIC + "/pay/connector", CREDENTIALS.username, CREDENTIALS.password)
    secret = secrets.token_urlsafe(32).encode()
    channel = tokenizer.channel("crm/crm-1")
    panel = await start_panel(PanelConfig(link_secret=secret, secure_cookies=False), channel)
    env = PanelEnv(ivr, panel, secret, channel)
    yield env
    await env.panel.stop()


async def restart_panel(env: PanelEnv) -> None:
    """Stop the panel and start it again on the same port (a replica restarting): every
    event stream drops and the page has to resume."""
    port = int(env.panel.url.rsplit(":", 1)[1])
    await env.panel.stop()
    env.panel = await start_panel(PanelConfig(link_secret=env.secret, secure_cookies=False),
                                  env.channel, port=port)


# ---- what the page holds -----------------------------------------------------------------


def network_bodies(driver: Any) -> list[str]:
    """Every response body and event-stream message the page received since the last call."""
    bodies: list[str] = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.eventSourceMessageReceived":
            bodies.append(params.get("data", ""))
        elif method == "Network.loadingFinished":
            try:
                body = driver.execute_cdp_cmd("Network.getResponseBody",
                                              {"requestId": params["requestId"]})
            except Exception:  # noqa: BLE001, S112 - a body already gone (redirects, streams)
                continue
            bodies.append(body.get("body", ""))
        elif method == "Network.responseReceived":
            bodies.append(json.dumps(params.get("response", {}).get("headers", {})))
    return bodies


def page_holdings(driver: Any) -> list[str]:
    """The DOM (with every attribute) and the browser storage of the page."""
    return [
        driver.page_source,
        driver.execute_script("return document.documentElement.outerHTML"),
        driver.execute_script("return document.body.innerText"),
        driver.execute_script("return JSON.stringify(Object.assign({}, window.localStorage))"),
        driver.execute_script(
            "return JSON.stringify(Object.assign({}, window.sessionStorage))"),
        json.dumps(driver.get_cookies()),
    ]


def assert_no_card_data(blobs: list[str], pan: str, expiry: str, cvv: str) -> None:
    """No PAN (whole, or its first 12), expiry or security code, standing on its own."""
    for blob in blobs:
        assert pan not in blob and pan[:12] not in blob and pan[:6] + " " not in blob
        for short in (expiry, cvv, f"{expiry[:2]}/{expiry[2:]}"):
            assert not re.search(rf"(?<![0-9A-Za-z]){re.escape(short)}(?![0-9A-Za-z])",
                                 blob), f"{len(short)}-character card field found"


def screenshot(driver: Any, name: str) -> None:
    """A screenshot of a key state, kept as a test artifact (.artifacts/, not committed)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))




class Page:
    """The browser, driven from async tests: every WebDriver call runs in a thread, so the
    in-process tokenizer, IVR, simulator and panel keep serving while the browser waits."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.network: list[str] = []

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def get(self, url: str) -> None:
        await self.run(self.driver.get, url)

    async def script(self, source: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, source, *args)

    async def text(self, selector: str) -> str:
        return str(await self.script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''",
            selector))

    async def visible(self, element_id: str) -> bool:
        return bool(await self.script(
            "const e = document.getElementById(arguments[0]); return !!e && !e.hidden",
            element_id))

    async def click(self, selector: str) -> None:
        from selenium.webdriver.common.by import By

        element = await self.run(self.driver.find_element, By.CSS_SELECTOR, selector)
        await self.run(element.click)

    async def wait_for(self, check: Callable[[], Awaitable[bool]], what: str,
                       timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            if time.monotonic() > deadline:
                await self.shot(f"timeout-{re.sub(r'[^a-z0-9]+', '-', what.lower())}")
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def wait_text(self, selector: str, wanted: str, timeout: float = 20.0) -> None:
        async def check() -> bool:
            return wanted in await self.text(selector)
        await self.wait_for(check, f"{selector} to say {wanted!r}", timeout)

    async def wait_visible(self, element_id: str, timeout: float = 20.0) -> None:
        async def check() -> bool:
            return await self.visible(element_id)
        await self.wait_for(check, f"#{element_id} to show", timeout)

    async def dots(self, field: str) -> int:
        return len(await self.text(f'li[data-field="{field}"] .dots'))

    async def shot(self, name: str) -> None:
        await self.run(screenshot, self.driver, name)

    async def collect(self) -> None:
        """Keep every body the page received so far (the log is drained on reading)."""
        self.network += await self.run(network_bodies, self.driver)

    async def holdings(self) -> list[str]:
        await self.collect()
        return [*await self.run(page_holdings, self.driver), *self.network]


@pytest_asyncio.fixture
async def page(browser: Any) -> Page:
    return Page(browser)
