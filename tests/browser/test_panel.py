"""The agent panel in a real headless Chromium (issue 16): signed-link sign-in, a card taken
end to end with the customer's keys coming from the Twilio simulator, an invalid card re-keyed,
a field asked again, a cancel, a dropped event stream resuming, a bad link refused and
keyboard-only use — and after each, no card number, expiry or security code in the DOM, in any
response or event the page received, or in browser storage. Screenshots of each key state go
to .artifacts/panel/ (not committed)."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.browser.conftest import Page, PanelEnv, assert_no_card_data, restart_panel
from vaultline.gen.tokenization.v1 import tokenization_pb2 as tpb
from vaultline.twilio_sim.payments import HANGUP, PaymentScript

pytestmark = pytest.mark.integration

VISA = "4111111111111111"
MASTERCARD = "5555555555554444"
EXPIRY = "0831"
CVV = "739"


def script(*cards: str, expiry: str = EXPIRY, cvv: str = CVV, delay: float = 0.04,
           **delays: float) -> PaymentScript:
    """The customer: one attempt per card given, keying every field `delay` s per key."""
    # Enough expiry and security code attempts for a field asked again.
    result = PaymentScript({"payment-card-number": list(cards),
                            "expiration-date": [expiry] * 3, "security-code": [cvv] * 3})
    result.key_delays = {f: delays.get(f.replace("-", "_"), delay) for f in result.attempts}
    return result


async def sign_in(page: Page, env: PanelEnv, customer: PaymentScript) -> Any:
    call = env.ivr.sim.agent_call(customer)
    await page.get(env.link(call.sid))
    await page.wait_visible("start")
    return call


async def record_statuses(page: Page, field: str) -> None:
    """Test instrumentation (not the panel's): every text a field's status shows, in order."""
    await page.script("""
        window.__statuses = [];
        const status = document.querySelector(`li[data-field="${arguments[0]}"] .status`);
        new MutationObserver(() => window.__statuses.push(status.textContent))
          .observe(status, {childList: true, characterData: true, subtree: true});""", field)


async def leaks(page: Page, pan: str = VISA) -> None:
    assert_no_card_data(await page.holdings(), pan, EXPIRY, CVV)


async def test_a_card_is_taken_end_to_end_showing_only_masked_progress(
    page: Page, panel_env: PanelEnv, tokenizer: Any,
) -> None:
    call = await sign_in(page, panel_env, script(VISA))
    # Signed in: the link's signature left the URL at once; the session is an HttpOnly,
    # SameSite=Strict cookie bound to the call.
    assert (await page.script("return location.pathname + location.search")) == "/panel/call"
    (cookie,) = await page.run(page.driver.get_cookies)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert call.sid in await page.text("#call")
    await page.shot("1-signed-in")

    await page.click("#take")

    async def keying() -> bool:
        return 0 < await page.dots("card-number") < 16
    await page.wait_for(keying, "the card number's dots")
    await page.shot("2-keying-card-number")
    await page.wait_text('li[data-field="card-number"] .status', "Valid")
    await page.wait_text('li[data-field="expiration-date"] .status', "Valid")
    await page.shot("3-card-number-valid")
    await page.wait_visible("result")
    await page.shot("4-completed")
    summary, token = await page.text("#card-summary"), await page.text("#token")
    assert summary == "Visa ending 1111" and token.startswith("tok_")
    got = await tokenizer.stub.GetToken(tpb.GetTokenRequest(token=token))
    assert got.token.last4 == "1111"
    # The screen reader heard the outcome; the agent's leg heard no tone.
    await page.wait_text("#live", "Card captured")
    assert call.tones_heard_by_agent() == 0
    seqs = [int(s) for s in (await page.script(
        "return document.getElementById('capture').dataset.seqs")).split(",") if s]
    assert seqs == list(range(1, len(seqs) + 1))
    await leaks(page)


async def test_an_invalid_card_is_shown_and_keyed_again(page: Page, panel_env: PanelEnv
                                                        ) -> None:
    await sign_in(page, panel_env, script("4111111111111112", VISA, card_number=0.1))
    await record_statuses(page, "card-number")
    await page.click("#take")
    # The second attempt's progress says which attempt it is.
    await page.wait_text('li[data-field="card-number"] .status', "attempt 2")
    await page.shot("5-card-number-attempt-2")
    await page.wait_visible("result")
    # In between, the row said why the first attempt failed.
    shown = await page.script("return window.__statuses")
    assert "Not a valid card number (attempt 1)" in shown, shown
    assert await page.text("#card-summary") == "Visa ending 1111"
    await leaks(page)
    assert_no_card_data(await page.holdings(), "4111111111111112", EXPIRY, CVV)


async def test_the_agent_asks_for_a_field_again(page: Page, panel_env: PanelEnv) -> None:
    """The customer misread the card: the agent asks for the number again while the expiry
    is being keyed slowly, and the second card is the one captured."""
    await sign_in(page, panel_env, script(VISA, MASTERCARD, expiration_date=0.4))
    await page.click("#take")
    await page.wait_text('li[data-field="card-number"] .status', "Valid")
    await page.click('li[data-field="card-number"] .again')
    await page.wait_text('li[data-field="card-number"] .status', "attempt 2")
    await page.shot("6-asked-again")
    await page.wait_visible("result", timeout=30)
    assert await page.text("#card-summary") == "Mastercard ending 4444"
    await leaks(page)
    assert_no_card_data(await page.holdings(), MASTERCARD, EXPIRY, CVV)


async def test_the_agent_cancels(page: Page, panel_env: PanelEnv) -> None:
    await sign_in(page, panel_env, script(VISA, delay=0.3))
    await page.click("#take")

    async def keying() -> bool:
        return await page.dots("card-number") > 0
    await page.wait_for(keying, "the first digit")
    await page.click("#cancel")
    await page.wait_visible("failure")
    assert await page.text("#failure-title") == "Card capture cancelled"
    await page.shot("7-cancelled")
    await leaks(page)


async def test_the_customer_hanging_up_is_said_plainly(page: Page, panel_env: PanelEnv
                                                       ) -> None:
    customer = script(VISA)
    customer.attempts["expiration-date"] = [HANGUP]
    await sign_in(page, panel_env, customer)
    await page.click("#take")
    await page.wait_visible("failure")
    assert await page.text("#failure-title") == "The customer hung up"
    assert "Nothing was saved" in await page.text("#failure-words")
    await page.wait_text("#live", "The customer hung up")
    await page.shot("12-customer-hung-up")
    await leaks(page)


async def test_a_dropped_event_stream_resumes_without_losing_or_repeating(
    page: Page, panel_env: PanelEnv,
) -> None:
    await sign_in(page, panel_env, script(VISA, delay=0.15))
    await page.click("#take")

    async def halfway() -> bool:
        return await page.dots("card-number") >= 5
    await page.wait_for(halfway, "five digits")
    await restart_panel(panel_env)  # every stream drops; the browser reconnects
    await page.wait_visible("result", timeout=40)
    seqs = [int(s) for s in (await page.script(
        "return document.getElementById('capture').dataset.seqs")).split(",") if s]
    assert seqs == list(range(1, len(seqs) + 1)), "no event lost or repeated"
    assert await page.text("#card-summary") == "Visa ending 1111"
    await page.shot("8-resumed-and-completed")
    await leaks(page)


async def test_keyboard_only(page: Page, panel_env: PanelEnv) -> None:
    from selenium.webdriver.common.keys import Keys

    await sign_in(page, panel_env, script(VISA))

    async def press(*keys: str) -> None:
        active = await page.script("return document.activeElement")
        await page.run(active.send_keys, *keys)

    # Tab order: the two checkboxes, then "Take card payment".
    await page.script("document.activeElement.blur(); window.focus()")
    body = await page.script("return document.body")
    await page.run(body.send_keys, Keys.TAB)
    assert await page.script("return document.activeElement.id") == "ask-security-code"
    await press(Keys.TAB)
    await press(Keys.SPACE)  # also ask for the postal code ... then change our mind
    await press(Keys.SPACE)
    await press(Keys.TAB)
    assert await page.script("return document.activeElement.id") == "take"
    await press(Keys.ENTER)
    await page.wait_visible("result")
    # Focus moved to the result's heading; the next Tab reaches "Copy token".
    assert await page.script("return document.activeElement.id") == "result-title"
    await press(Keys.TAB)
    assert await page.script("return document.activeElement.id") == "copy"
    await press(Keys.ENTER)
    await page.wait_visible("copied")
    await page.shot("9-keyboard-only-copied")
    await leaks(page)


@pytest.mark.parametrize("tamper", ["signature", "expired", "missing", "far-future"])
async def test_a_bad_link_is_refused(page: Page, panel_env: PanelEnv, tamper: str) -> None:
    call = panel_env.ivr.sim.agent_call(script(VISA))
    link = panel_env.link(call.sid)
    if tamper == "signature":
        link = link[:-1] + ("0" if link[-1] != "0" else "1")
    elif tamper == "expired":
        link = panel_env.link(call.sid, ttl=-5)
    elif tamper == "missing":
        link = link.split("&sig=")[0]
    else:
        link = panel_env.link(call.sid, ttl=24 * 3600)
    await page.get(link)
    assert "This link is not valid" in await page.text("h1")
    assert await page.run(page.driver.get_cookies) == []
    # And the page itself, without a session, is the same refusal.
    await page.get(panel_env.panel.url + "/panel/call")
    assert "This link is not valid" in await page.text("h1")
    if tamper == "signature":
        await page.shot("10-bad-link")


async def test_the_page_is_locked_down_and_fits_a_narrow_screen(
    page: Page, panel_env: PanelEnv,
) -> None:
    await sign_in(page, panel_env, script(VISA))
    # The HTTP answers: strict CSP, no caching, no framing, no referrer.
    def fetch_headers() -> Any:
        url = panel_env.panel.url + "/panel/static/panel.js"
        with urllib.request.urlopen(url) as answer:  # noqa: S310 - loopback http
            return answer.headers
    headers = await asyncio.to_thread(fetch_headers)
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert headers["Cache-Control"] == "no-store" and headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"
    # No inline script, no third-party origin in the document.
    assert await page.script(
        "return [...document.scripts].every(s => s.src && new URL(s.src).origin === "
        "location.origin)")
    # State changes need the CSRF token: a POST without it is refused.
    status = await page.script("""
        return fetch('/panel/api/capture', {method: 'POST', credentials: 'same-origin',
          headers: {'Content-Type': 'application/json'}, body: '{"request": "x"}'})
        .then(r => r.status)""")
    assert status == 403
    # 320 CSS px wide (also what 200 % zoom of a 640 px window gives): nothing scrolls sideways.
    await page.run(page.driver.set_window_size, 320, 800)
    await page.script("return 1")
    width = await page.script(
        "return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], width
    await page.shot("11-narrow-320px")


async def test_signing_in_needs_nothing_but_the_link(panel_env: PanelEnv) -> None:
    """Without a browser: the API refuses a request with no session cookie."""
    for path in ("/panel/api/state", "/panel/api/events"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(urllib.request.urlopen, panel_env.panel.url + path)
        assert refused.value.code == 403
