"""The simulator's agent-assisted Payments: a conference leg for the agent, the Payment
resource on the customer's leg, the customer's keypad, masked StatusCallbacks and the Generic
Pay Connector call.

REST (HTTP Basic, as every simulator path):

    POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}/Payments.json          create
    POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}/Payments/{Sid}.json    update

A `Capture=<field>` update makes the customer key that field's next attempt from their
`PaymentScript` (one key every 0.3 simulated seconds, recorded on the customer's timeline with
the recording's state; the agent's leg hears none of them, as Twilio suppresses the tones), and
posts StatusCallbacks as Twilio does: `PartialResult=true` with a masked value while digits
arrive, then the field's outcome (`ErrorType` when invalid, else `Required` listing what is
still missing). `Status=complete` sends the card to the Pay Connector (HTTP Basic, Twilio's
JSON, retried with the same `transaction_id` on a timeout or a 5xx) and posts the `Result` with
the `PaymentToken`. A `*` pressed ends the Payment (`caller-interrupted-with-star`); a hang-up
in the script ends the call (`caller-hung-up`).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import secrets
import time
import xml.etree.ElementTree as ET  # noqa: S405 TwiML comes from the service under test
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from ..card import CardBrand, detect_brand, luhn_ok

__all__ = ["ConnectorConfig", "PaymentScript", "SimPayment", "SimPayments", "twilio_error",
           "twilio_time"]

KEY_SECONDS = 0.3
FIELDS = ("payment-card-number", "expiration-date", "security-code", "postal-code")
_ERRORS = {
    "payment-card-number": "invalid-card-number",
    "expiration-date": "invalid-date",
    "security-code": "invalid-security-code",
    "postal-code": "invalid-postal-code",
}
# Twilio's ValidCardTypes names of the brands the simulator recognises.
CARD_TYPES = {
    CardBrand.VISA: "visa", CardBrand.MASTERCARD: "mastercard", CardBrand.AMEX: "amex",
    CardBrand.DISCOVER: "discover", CardBrand.JCB: "jcb", CardBrand.DINERS: "diners-club",
    CardBrand.MAESTRO: "maestro", CardBrand.UNIONPAY: "unionpay",
}
DEFAULT_CARD_TYPES = "visa mastercard amex"  # Twilio's default ValidCardTypes
_VALUE_PARAM = {
    "payment-card-number": "PaymentCardNumber",
    "expiration-date": "ExpirationDate",
    "security-code": "SecurityCode",
    "postal-code": "PaymentCardPostalCode",
}


def twilio_time() -> str:
    """Now, as Twilio writes dates (RFC 2822, UTC)."""
    return dt.datetime.now(dt.UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")


def twilio_error(status: int, code: int, message: str) -> web.Response:
    """An error answer as Twilio's REST API gives it."""
    return web.json_response({"code": code, "message": message, "status": status,
                              "more_info": f"https://www.twilio.com/docs/errors/{code}"},
                             status=status)


@dataclass
class PaymentScript:
    """What the customer keys for each field (Twilio's names), one string per attempt.
    `HANGUP` as an attempt hangs up there; a `*` anywhere ends the Payment."""

    attempts: dict[str, list[str]] = field(default_factory=dict)
    # Real seconds between keys, per field (a customer slower than the agent's next click).
    key_delays: dict[str, float] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"PaymentScript(<{sum(map(len, self.attempts.values()))} attempts>)"

    @classmethod
    def card(cls, pan: str, expiry: str, cvv: str = "", postal: str = "") -> PaymentScript:
        attempts = {"payment-card-number": [pan], "expiration-date": [expiry]}
        if cvv:
            attempts["security-code"] = [cvv]
        if postal:
            attempts["postal-code"] = [postal]
        return cls(attempts)


HANGUP = "<hangup>"


@dataclass(frozen=True)
class ConnectorConfig:
    url: str
    username: str
    password: str = field(repr=False)


@dataclass
class SimPayment:
    sid: str
    call_sid: str
    status_callback: str
    connector: str
    security_code: bool
    postal_code: bool
    card_types: frozenset[str] = frozenset(DEFAULT_CARD_TYPES.split())
    status: str = "capturing"  # capturing | completing | complete | cancelled | failed
    entered: dict[str, str] = field(default_factory=dict, repr=False)  # digits, in memory
    transaction_id: str = ""
    connector_attempts: int = 0
    connector_seconds: float | None = None  # the connector call's round trip (last attempt)
    callbacks: list[dict[str, str]] = field(default_factory=list)  # what was posted (masked)
    # <Pay>: what its action URL reports of the card (masked, as Twilio's), until answered.
    entered_copy: dict[str, Any] = field(default_factory=dict, repr=False)

    def required(self) -> list[str]:
        wanted = ["payment-card-number", "expiration-date"]
        wanted += ["security-code"] if self.security_code else []
        wanted += ["postal-code"] if self.postal_code else []
        return [f for f in wanted if f not in self.entered]


def _valid(name: str, digits: str) -> bool:
    if name == "payment-card-number":
        return 12 <= len(digits) <= 19 and digits.isdigit() and luhn_ok(digits)
    if name == "expiration-date":
        if len(digits) != 4 or not digits.isdigit() or not 1 <= int(digits[:2]) <= 12:
            return False
        today = dt.datetime.now(dt.UTC).date()
        return (2000 + int(digits[2:]), int(digits[:2])) >= (today.year, today.month)
    if name == "security-code":
        return digits.isdigit() and 3 <= len(digits) <= 4
    return digits.isalnum() and 3 <= len(digits) <= 10


class SimPayments:
    """Owned by a `TwilioSim`; its REST handlers are registered there."""

    def __init__(self, sim: Any) -> None:  # the owning TwilioSim (sim.py imports this module)
        self._sim = sim
        self.payments: dict[str, SimPayment] = {}
        self.by_idempotency: dict[str, str] = {}
        self.connectors: dict[str, ConnectorConfig] = {}
        self.scripts: dict[str, PaymentScript] = {}  # by customer call sid
        self.connector_timeout = 5.0
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- REST ---------------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        call, form, error = await self._sim._rest_common(request)
        if error is not None:
            return error
        assert call is not None
        if not form.get("IdempotencyKey") or not form.get("StatusCallback"):
            return twilio_error(400, 21201, "IdempotencyKey and StatusCallback are required")
        known = self.by_idempotency.get(form["IdempotencyKey"])
        if known is not None:
            return web.json_response(self._json(self.payments[known]), status=201)
        if call.status != "in-progress":
            return twilio_error(400, 21220, "Call is not in-progress")
        if any(p.call_sid == call.sid and p.status in ("capturing", "completing")
               for p in self.payments.values()):
            return twilio_error(409, 64021, "A payment session is already in progress")
        connector = form.get("PaymentConnector", "Default")
        if connector not in self.connectors:
            return twilio_error(400, 64004, "Unknown Pay Connector")
        if form.get("ChargeAmount", "0") not in ("0", "0.0", "0.00", ""):
            return twilio_error(400, 64007, "This connector cannot charge")
        payment = SimPayment(
            "PK" + secrets.token_hex(16), call.sid, form["StatusCallback"], connector,
            form.get("SecurityCode", "true") == "true", form.get("PostalCode", "true") == "true",
            frozenset((form.get("ValidCardTypes") or DEFAULT_CARD_TYPES).split()))
        payment.transaction_id = "tx_" + payment.sid
        self.payments[payment.sid] = payment
        self.by_idempotency[form["IdempotencyKey"]] = payment.sid
        call.add("payment", f"created {payment.sid}")
        return web.json_response(self._json(payment), status=201)

    async def update(self, request: web.Request) -> web.Response:
        call, form, error = await self._sim._rest_common(request)
        if error is not None:
            return error
        assert call is not None
        payment = self.payments.get(request.match_info["payment"])
        if payment is None or payment.call_sid != call.sid:
            return twilio_error(404, 20404, "The requested resource was not found")
        if not form.get("IdempotencyKey") or not form.get("StatusCallback"):
            return twilio_error(400, 21201, "IdempotencyKey and StatusCallback are required")
        if self.by_idempotency.get(form["IdempotencyKey"]) == payment.sid + ":update":
            return web.json_response(self._json(payment), status=202)
        capture, status = form.get("Capture", ""), form.get("Status", "")
        if bool(capture) == bool(status) or (capture and capture not in FIELDS) or (
                status and status not in ("complete", "cancel")):
            return twilio_error(400, 21220, "Give one of Capture or Status")
        if payment.status != "capturing":
            return twilio_error(400, 64021, "The payment session has ended")
        self.by_idempotency[form["IdempotencyKey"]] = payment.sid + ":update"
        if capture:
            self._spawn(self._capture(call, payment, capture))
        elif status == "complete":
            payment.status = "completing"
            self._spawn(self._complete(call, payment))
        else:
            payment.status = "cancelled"
            payment.entered.clear()
            call.add("payment", f"cancelled {payment.sid}")
        return web.json_response(self._json(payment), status=202)

    def _json(self, payment: SimPayment) -> dict[str, Any]:
        now = twilio_time()
        api = f"/2010-04-01/Accounts/{self._sim.account_sid}"
        return {"sid": payment.sid, "call_sid": payment.call_sid,
                "account_sid": self._sim.account_sid, "date_created": now,
                "date_updated": now,
                "uri": f"{api}/Calls/{payment.call_sid}/Payments/{payment.sid}.json"}

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def listing(self, request: web.Request) -> web.Response:
        """Control path (not Twilio): the Payments so far, without card data."""
        if request.remote not in ("127.0.0.1", "::1"):
            return web.Response(status=403)
        return web.json_response([
            {"sid": p.sid, "call_sid": p.call_sid, "status": p.status,
             "status_callback": p.status_callback,
             "connector_attempts": p.connector_attempts,
             "connector_seconds": p.connector_seconds} for p in self.payments.values()])

    async def drain(self) -> None:
        """Wait for the keypad and connector work in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ---- the customer's keypad ------------------------------------------------------------------

    async def _capture(self, call: Any, payment: SimPayment, name: str) -> None:
        script = self.scripts.get(call.sid, PaymentScript())
        attempts = script.attempts.get(name, [])
        keys = attempts.pop(0) if attempts else ""
        if keys == HANGUP:
            call.ended_by = "caller"
            call.status = "completed"
            call.add("hangup", "caller")
            payment.status = "failed"
            await self._callback(payment, {"Result": "caller-hung-up"})
            return
        digits = ""
        for key in keys:
            if payment.status != "capturing" or call.status == "completed":
                return  # cancelled, or the customer hung up, meanwhile
            call.clock += KEY_SECONDS
            call.add("pressed", key, sensitive=True)  # customer's leg; the agent hears none
            if key == "*":
                payment.status = "cancelled"
                payment.entered.clear()
                await self._callback(payment, {"Result": "caller-interrupted-with-star"})
                return
            digits += key
            await self._callback(payment, {"Capture": name, "PartialResult": "true",
                                           _VALUE_PARAM[name]: "x" * len(digits)})
            await asyncio.sleep(script.key_delays.get(name, 0.0))
        if not digits:
            await self._callback(payment, {"Capture": name, "ErrorType": "input-timeout",
                                           "PartialResult": "false"})
            return
        if not _valid(name, digits):
            await self._callback(payment, {"Capture": name, "ErrorType": _ERRORS[name],
                                           "PartialResult": "false"})
            return
        if name == "payment-card-number":
            brand = detect_brand(digits)
            if brand is None or CARD_TYPES.get(brand) not in payment.card_types:
                await self._callback(payment, {"Capture": name,
                                               "ErrorType": "invalid-card-type",
                                               "PartialResult": "false"})
                return
        payment.entered[name] = digits
        masked = ("x" * (len(digits) - 4) + digits[-4:] if name == "payment-card-number"
                  else "x" * len(digits))
        await self._callback(payment, {"Capture": name, "PartialResult": "false",
                                       _VALUE_PARAM[name]: masked,
                                       "Required": ",".join(payment.required())})

    # ---- <Pay>: a self-service capture ----------------------------------------------------------

    async def pay_verb(self, call: Any, verb: ET.Element,
                       next_keys: Callable[[], Awaitable[str | None]]) -> dict[str, str]:
        """Run a <Pay>: ask for each field, validate it as Twilio does, hand the card to the
        Pay Connector; the parameters its action URL gets (card fields masked)."""
        connector = verb.get("paymentConnector", "Default")
        payment = SimPayment(
            "PK" + secrets.token_hex(16), call.sid, "", connector,
            verb.get("securityCode", "true") == "true", verb.get("postalCode", "true") == "true",
            frozenset((verb.get("validCardTypes") or DEFAULT_CARD_TYPES).split()))
        payment.transaction_id = "tx_" + payment.sid
        self.payments[payment.sid] = payment
        call.add("payment", f"<Pay> {payment.sid}")
        if connector not in self.connectors or verb.get("chargeAmount", "0") not in (
                "0", "0.0", "0.00", ""):
            payment.status = "failed"
            return {"Result": "validation-error", "PayErrorCode": "64004"}
        max_attempts = int(verb.get("maxAttempts", "1") or 1)
        parameters = {p.get("name", ""): p.get("value", "") for p in verb
                      if p.tag == "Parameter"}
        for name in payment.required():
            error = ""
            for attempt in range(max_attempts + 1):
                if attempt == max_attempts:
                    payment.status = "failed"
                    payment.entered.clear()
                    return {"Result": "too-many-failed-attempts", "ErrorType": error}
                self._prompt(call, verb, name, error)
                keys = await next_keys()
                if keys is None:
                    payment.status = "failed"
                    payment.entered.clear()
                    call.status = "completed"
                    return {"Result": "caller-hung-up"}
                digits = ""
                for key in keys:
                    call.clock += KEY_SECONDS
                    call.add("pressed", key, sensitive=True)
                    if key == "*":
                        payment.status = "cancelled"
                        payment.entered.clear()
                        return {"Result": "caller-interrupted-with-star"}
                    if key != "#":
                        digits += key
                error = self._field_error(payment, name, digits)
                if not error:
                    payment.entered[name] = digits
                    break
        payment.status = "completing"
        self._prompt(call, verb, "payment-processing", "")
        result = await self._tokenize(call, payment, parameters)
        if result.get("Result") == "success":
            card = payment.entered_copy
            result.update({"PaymentCardType": card.get("type", ""),
                           "PaymentCardNumber": card.get("masked", ""),
                           "ExpirationDate": card.get("expiry", ""),
                           "SecurityCode": "x" * card.get("cvv_len", 0),
                           "PaymentCardPostalCode": card.get("postal", "")})
        payment.entered_copy = {}
        return result

    def _prompt(self, call: Any, verb: ET.Element, name: str, error: str) -> None:
        """Speak the <Prompt> for this field and error (Twilio's default when none is given)."""
        wanted = {"input-timeout": "timeout"}.get(error, error)
        matches = [p for p in verb if p.tag == "Prompt" and p.get("for") == name
                   and (p.get("errorType", "") == wanted
                        or wanted in p.get("errorType", "").split())]
        if not matches and name != "payment-processing":
            call.add("heard", f"[Twilio's prompt for {name}{' after ' + error if error else ''}]")
        for prompt in matches[:1]:
            for child in prompt:
                self._sim._speak(call, child)

    @staticmethod
    def _field_error(payment: SimPayment, name: str, digits: str) -> str:
        """Twilio's ErrorType for this entry, or "" when it is valid."""
        if not digits:
            return "input-timeout"
        if not _valid(name, digits):
            return _ERRORS[name]
        if name == "payment-card-number":
            brand = detect_brand(digits)
            if brand is None or CARD_TYPES.get(brand) not in payment.card_types:
                return "invalid-card-type"
        if name == "security-code":
            brand = detect_brand(payment.entered.get("payment-card-number", ""))
            if len(digits) != (4 if brand is CardBrand.AMEX else 3):
                return "invalid-security-code"
        return ""

    async def _tokenize(self, call: Any, payment: SimPayment,
                        parameters: Mapping[str, str]) -> dict[str, str]:
        """The card to the Pay Connector; the action's Result (and token) it leads to."""
        entered = payment.entered
        pan = entered.get("payment-card-number", "")
        brand = detect_brand(pan)
        payment.entered_copy = {
            "type": CARD_TYPES.get(brand, "") if brand is not None else "",
            "masked": "x" * (len(pan) - 4) + pan[-4:],
            "expiry": entered.get("expiration-date", ""),
            "cvv_len": len(entered.get("security-code", "")),
            "postal": entered.get("postal-code", ""),
        }
        answer = await self._send_card(payment, dict(parameters))
        if answer is not None and answer.get("token_id") and not answer.get("error_code"):
            payment.status = "complete"
            call.add("payment", f"complete {payment.sid}")
            return {"Result": "success", "PaymentToken": str(answer["token_id"])}
        payment.status = "failed"
        payment.entered_copy = {}
        code = str(answer.get("error_code")) if answer else "64010"
        call.add("payment", f"connector error {payment.sid}")
        return {"Result": "payment-connector-error", "ConnectorError": code[:40]}

    async def _send_card(self, payment: SimPayment, parameters: dict[str, str]
                         ) -> dict[str, Any] | None:
        """Twilio's tokenize request to the Pay Connector; the card is forgotten after it."""
        connector = self.connectors[payment.connector]
        expiry = payment.entered.get("expiration-date", "")
        body: dict[str, Any] = {"method": "tokenize", "transaction_id": payment.transaction_id,
                "cardnumber": payment.entered.get("payment-card-number", ""),
                "cvv": payment.entered.get("security-code", ""),
                "expiry_month": expiry[:2], "expiry_year": expiry[2:],
                "postal_code": payment.entered.get("postal-code", ""),
                "description": "", "parameters": parameters}
        answer = await self._post_connector(connector, payment, json.dumps(body).encode())
        payment.entered.clear()  # Twilio keeps nothing once the connector has it
        del body
        return answer

    # ---- complete: the Pay Connector --------------------------------------------------------

    async def _complete(self, call: Any, payment: SimPayment) -> None:
        last4 = payment.entered.get("payment-card-number", "")[-4:]
        answer = await self._send_card(payment, {})
        if answer is not None and answer.get("token_id") and not answer.get("error_code"):
            payment.status = "complete"
            call.add("payment", f"complete {payment.sid}")
            await self._callback(payment, {
                "Result": "success", "PaymentToken": str(answer["token_id"]),
                "PaymentCardNumber": "xxxxxxxxxxxx" + last4, "ExpirationDate": "xxxx"})
            return
        payment.status = "failed"
        code = str(answer.get("error_code")) if answer else "64010"
        call.add("payment", f"connector error {payment.sid}")
        await self._callback(payment, {"Result": "payment-connector-error",
                                       "ConnectorError": code[:40]})

    async def _post_connector(self, connector: ConnectorConfig, payment: SimPayment,
                              body: bytes) -> dict[str, Any] | None:
        """POST as Twilio does, retried (same transaction_id) on a timeout or a 5xx."""
        http = self._sim._http
        assert http is not None
        basic = base64.b64encode(f"{connector.username}:{connector.password}".encode()).decode()
        headers = {"Authorization": f"Basic {basic}", "Content-Type": "application/json"}
        last: dict[str, Any] | None = None
        for _ in range(3):
            payment.connector_attempts += 1
            started = time.perf_counter()
            try:
                async with http.post(self._sim._target(connector.url), data=body,
                                     headers=headers,
                                     timeout=aiohttp.ClientTimeout(
                                         total=self.connector_timeout)) as response:
                    text = await response.text()
                    payment.connector_seconds = time.perf_counter() - started
                    try:
                        answer = json.loads(text)
                    except ValueError:
                        answer = None
                    if not isinstance(answer, dict):
                        answer = None
                    if response.status >= 500:
                        last = answer  # retried; its error code is kept for the callback
                        continue
                    return answer
            except (aiohttp.ClientError, TimeoutError, OSError):
                continue
        return last

    # ---- StatusCallbacks ----------------------------------------------------------------------

    async def _callback(self, payment: SimPayment, params: Mapping[str, str]) -> None:
        now = twilio_time()
        full = {"AccountSid": self._sim.account_sid, "CallSid": payment.call_sid,
                "Sid": payment.sid, "DateCreated": now, "DateUpdated": now, **params}
        payment.callbacks.append(dict(full))
        try:
            await self._sim.post(payment.status_callback, full)
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass  # Twilio does not retry status callbacks either
