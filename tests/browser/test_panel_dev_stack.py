"""The agent panel as `make run` serves it: the dev stack, `vaultline sim agent-call --hold`
(which prints the panel link, as `vaultline panel link` makes it), and a real Chromium taking
the card — the customer's keys come from the simulator when Twilio asks for each field."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import assert_no_card_data, network_bodies, page_holdings, screenshot
from tests.fixtures.devstack import VAULTLINE, Stack

pytestmark = pytest.mark.e2e

PAN, EXPIRY, CVV = "5555555555554444", "0931", "738"


def _wait(driver: Any, script: str, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not driver.execute_script(script):
        if time.monotonic() > deadline:
            screenshot(driver, f"dev-stack-timeout-{what}")
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_an_agent_takes_a_card_in_the_dev_stack(home: Path, browser: Any) -> None:
    stack = Stack(home)
    info = stack.up()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAULTLINE_")}
    hold = subprocess.Popen(
        [*VAULTLINE, "--home", str(home), "sim", "agent-call", "--hold", "--card", PAN,
         "--expiry", EXPIRY, "--cvv", CVV, "--key-delay", "0.05", "--agent", "agent-42"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert hold.stdout is not None
        link = ""
        for line in hold.stdout:
            if line.startswith("agent panel"):
                link = line.split(": ", 1)[1].strip()
                break
        assert link.startswith(info["panel_url"] + "/panel?call=CA"), link
        # The same link `vaultline panel link` makes for that call and agent.
        call_sid = link.split("call=", 1)[1].split("&", 1)[0]
        made = subprocess.run(
            [*VAULTLINE, "--home", str(home), "panel", "link", "--call", call_sid,
             "--agent", "agent-42"], capture_output=True, text=True, env=env, check=True)
        assert made.stdout.startswith(info["panel_url"] + f"/panel?call={call_sid}&agent=")

        browser.get(made.stdout.strip())
        _wait(browser, "return !document.getElementById('start').hidden", "the start page")
        browser.find_element("id", "take").click()
        _wait(browser, "return !document.getElementById('result').hidden", "the result")
        screenshot(browser, "dev-stack-completed")
        assert browser.find_element("id", "card-summary").text == "Mastercard ending 4444"
        assert browser.find_element("id", "token").text.startswith("tok_")
        assert_no_card_data([*page_holdings(browser), *network_bodies(browser)],
                            PAN, EXPIRY, CVV)
    finally:
        hold.terminate()
        hold.wait(timeout=30)
        assert stack.interrupt() == 0
