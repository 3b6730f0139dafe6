"""IVR call flows: the frozen model of `ivr_flows/*.yaml` and its validating loader.

Pure apart from `load_flow`/`load_flows` reading files. Every problem found is reported at
once as a `FlowError` whose lines each name the file and the field path, e.g.
``ivr_flows/card_capture.yaml: steps[1].timeout: must be an integer 1-60``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..card import CardBrand

__all__ = [
    "ERROR_TYPES",
    "MODES",
    "PAY_CARD_TYPES",
    "PAY_FIELDS",
    "Ending",
    "Flow",
    "FlowError",
    "Prompt",
    "Step",
    "StepKind",
    "load_flow",
    "load_flows",
    "parse_flow",
]

# Step kinds, in the only order a flow may use them (sensitive ones first, confirmation last).
StepKind = str
STEP_ORDER: tuple[StepKind, ...] = (
    "card_number", "expiry", "security_code", "postal_code", "confirmation",
)
SENSITIVE_STEPS = frozenset({"card_number", "expiry", "security_code", "postal_code"})
REQUIRED_STEPS = ("card_number", "expiry")

# Re-prompt error types each step can raise (Twilio's <Pay> ErrorType names where one exists).
ERROR_TYPES: dict[StepKind, tuple[str, ...]] = {
    "card_number": ("invalid-card-number", "invalid-card-type", "input-timeout"),
    "expiry": ("invalid-date", "input-timeout"),
    "security_code": ("invalid-security-code", "input-timeout"),
    "postal_code": ("invalid-postal-code", "input-timeout"),
    "confirmation": ("invalid-confirmation", "input-timeout"),
}
_DEFAULT_REPROMPTS: dict[str, str] = {
    "invalid-card-number": "That card number is not valid.",
    "invalid-card-type": "Sorry, we do not accept that type of card.",
    "invalid-date": "That expiry date is not valid.",
    "invalid-security-code": "That security code is not valid.",
    "invalid-postal-code": "That postal code is not valid.",
    "invalid-confirmation": "Sorry, I did not understand.",
    "input-timeout": "Sorry, we did not receive your entry.",
}
_DEFAULT_PROMPTS: dict[StepKind, str] = {
    "card_number": "Please enter your card number, followed by the hash key.",
    "expiry": "Please enter the expiry date as four digits, two for the month and two for the"
              " year.",
    "security_code": "Please enter the security code.",
    "postal_code": "Please enter the billing postal code, followed by the hash key.",
    "confirmation": "You entered a {brand} card ending in {last4}. Press 1 to confirm, or star"
                    " to enter it again.",
}
# `mode: gather` collects each field with <Gather> (the webhook validates the digits);
# `mode: pay` hands the whole capture to Twilio's <Pay> and the Pay Connector, so the webhook
# never sees a card digit: only the token comes back (issue 15).
MODES = ("gather", "pay")
# <Pay>'s `<Prompt for=…>` name of each step.
PAY_FIELDS: dict[StepKind, str] = {
    "card_number": "payment-card-number", "expiry": "expiration-date",
    "security_code": "security-code", "postal_code": "postal-code",
}
# Twilio's `validCardTypes` names (UnionPay has none: a pay flow cannot accept it).
PAY_CARD_TYPES: dict[CardBrand, str] = {
    CardBrand.VISA: "visa", CardBrand.MASTERCARD: "mastercard", CardBrand.AMEX: "amex",
    CardBrand.DISCOVER: "discover", CardBrand.JCB: "jcb", CardBrand.DINERS: "diners-club",
    CardBrand.MAESTRO: "maestro",
}
PAY_MAX_ATTEMPTS = 3  # <Pay maxAttempts> is 1-3
_DEFAULT_APOLOGY = "Sorry, we are having a technical problem."
_DEFAULT_REENTER = "Let's start that entry again."
ENDING_ACTIONS = ("hangup", "redirect", "enqueue", "conference")

_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}\Z")
_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")
_FINISH_KEYS = ("", "#", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9")  # '*' means re-enter
_QUEUE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_TOKEN_FORMATS = ("numeric", "numeric_keep_bin", "opaque")


class FlowError(ValueError):
    """A flow file is unusable. `problems` holds one 'file: field: message' line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    voice: str = ""
    language: str = ""


@dataclass(frozen=True, slots=True)
class Step:
    kind: StepKind
    prompt: Prompt
    timeout: int = 5
    finish_on_key: str = "#"
    max_attempts: int = 3
    reprompts: Mapping[str, Prompt] = field(default_factory=dict)
    min_length: int = 0  # postal code only
    max_length: int = 0  # postal code only

    @property
    def sensitive(self) -> bool:
        return self.kind in SENSITIVE_STEPS


@dataclass(frozen=True, slots=True)
class Ending:
    """What the caller hears and where the call goes when the capture ends."""

    say: Prompt | None
    action: str = "hangup"  # hangup | redirect | enqueue | conference
    url: str = ""  # redirect: absolute, or a path under the public base URL
    queue: str = ""  # enqueue: the TaskRouter/queue name


@dataclass(frozen=True, slots=True)
class Flow:
    name: str
    tenant: str
    steps: tuple[Step, ...]
    on_success: Ending
    on_failure: Ending
    token_format: str = "numeric"  # noqa: S105 a token format name, not a secret
    accepted_brands: frozenset[CardBrand] = frozenset(CardBrand)
    greeting: Prompt | None = None
    apology: Prompt = Prompt(_DEFAULT_APOLOGY)
    reenter: Prompt = Prompt(_DEFAULT_REENTER)
    crm_callback_url: str = ""
    source: str = ""
    mode: str = "gather"  # gather | pay (see MODES)

    def step_index(self, kind: StepKind) -> int:
        for i, step in enumerate(self.steps):
            if step.kind == kind:
                return i
        return -1

    @property
    def last_sensitive_index(self) -> int:
        return max(i for i, s in enumerate(self.steps) if s.sensitive)


# ---- parsing -------------------------------------------------------------------------------


class _Checker:
    """Collects problems with their field paths instead of stopping at the first."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{self.source}: {path}: {message}")

    def mapping(self, value: Any, path: str) -> Mapping[str, Any] | None:
        if not isinstance(value, Mapping):
            self.fail(path, "must be a mapping")
            return None
        return value

    def keys(self, value: Mapping[str, Any], path: str, allowed: set[str]) -> None:
        for key in value:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                self.fail(where, f"unknown field (allowed: {', '.join(sorted(allowed))})")

    def text(self, value: Any, path: str, *, required: bool = True) -> str:
        if value is None and not required:
            return ""
        if not isinstance(value, str) or not value.strip():
            self.fail(path, "must be a non-empty string")
            return ""
        if len(value) > 1000:
            self.fail(path, "must be at most 1000 characters")
        return value

    def integer(self, value: Any, path: str, lo: int, hi: int) -> int:
        if type(value) is not int or not lo <= value <= hi:
            self.fail(path, f"must be an integer {lo}-{hi}")
            return lo
        return value

    def prompt(self, value: Any, path: str, defaults: Prompt) -> Prompt:
        if isinstance(value, str):
            return Prompt(self.text(value, path), defaults.voice, defaults.language)
        m = self.mapping(value, path)
        if m is None:
            return defaults
        self.keys(m, path, {"text", "voice", "language"})
        return Prompt(
            self.text(m.get("text"), f"{path}.text"),
            self.text(m.get("voice", defaults.voice) or None, f"{path}.voice", required=False),
            self.text(m.get("language", defaults.language) or None, f"{path}.language",
                      required=False),
        )


def parse_flow(data: Any, source: str = "<flow>") -> Flow:
    """Validate a decoded YAML document; raise FlowError listing every problem."""
    c = _Checker(source)
    top = c.mapping(data, "(document)")
    if top is None:
        raise FlowError(c.problems)
    c.keys(top, "", {"name", "tenant", "mode", "token_format", "accepted_brands", "voice",
                     "greeting", "apology", "reenter", "steps", "on_success", "on_failure",
                     "crm"})
    mode = top.get("mode", "gather")
    if mode not in MODES:
        c.fail("mode", f"must be one of {', '.join(MODES)}")
        mode = "gather"

    name = top.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        c.fail("name", "must be 1-63 of a-z, 0-9 and '_', starting with a letter")
        name = ""
    tenant = top.get("tenant")
    if not isinstance(tenant, str) or not _TENANT.match(tenant):
        c.fail("tenant", "must be 1-63 of a-z, 0-9, '_' or '-', starting alphanumeric")
        tenant = ""
    token_format = top.get("token_format", "numeric")
    if token_format not in _TOKEN_FORMATS:
        c.fail("token_format", f"must be one of {', '.join(_TOKEN_FORMATS)}")

    brands: frozenset[CardBrand] = frozenset(CardBrand)
    if "accepted_brands" in top:
        raw = top["accepted_brands"]
        if not isinstance(raw, list) or not raw:
            c.fail("accepted_brands", "must be a non-empty list of card brands")
        else:
            picked = set()
            for i, b in enumerate(raw):
                if not isinstance(b, str) or b.upper() not in CardBrand.__members__:
                    c.fail(f"accepted_brands[{i}]",
                           f"unknown brand (one of {', '.join(CardBrand.__members__)})")
                else:
                    picked.add(CardBrand[b.upper()])
            brands = frozenset(picked) or brands

    base = Prompt("")
    if "voice" in top:
        v = c.mapping(top["voice"], "voice")
        if v is not None:
            c.keys(v, "voice", {"voice", "language"})
            base = Prompt("", c.text(v.get("voice"), "voice.voice", required=False),
                          c.text(v.get("language"), "voice.language", required=False))

    def prompt(key: str, default: str | None) -> Prompt | None:
        if key in top:
            return c.prompt(top[key], key, base)
        return None if default is None else Prompt(default, base.voice, base.language)

    greeting = prompt("greeting", None)
    apology = prompt("apology", _DEFAULT_APOLOGY)
    reenter = prompt("reenter", _DEFAULT_REENTER)

    steps = _steps(c, top.get("steps"), base)
    if mode == "pay":
        _check_pay(c, top.get("steps"), steps, brands)
        if "token_format" in top:
            c.fail("token_format", "not used with mode: pay (the Pay Connector's format, "
                                   "VAULTLINE_PAY_CONNECTOR_TOKEN_FORMAT, applies)")
    on_success = _ending(c, top.get("on_success"), "on_success", base)
    on_failure = _ending(c, top.get("on_failure"), "on_failure", base)

    crm_url = ""
    if "crm" in top:
        crm = c.mapping(top["crm"], "crm")
        if crm is not None:
            c.keys(crm, "crm", {"callback_url"})
            crm_url = c.text(crm.get("callback_url"), "crm.callback_url")
            if crm_url and not crm_url.startswith(("http://", "https://")):
                c.fail("crm.callback_url", "must be an http(s):// URL")

    if c.problems:
        raise FlowError(c.problems)
    assert apology is not None and reenter is not None
    return Flow(
        name=name, tenant=tenant, steps=steps, on_success=on_success, on_failure=on_failure,
        token_format=token_format, accepted_brands=brands, greeting=greeting, apology=apology,
        reenter=reenter, crm_callback_url=crm_url, source=source, mode=mode,
    )


def _check_pay(c: _Checker, raw: Any, steps: tuple[Step, ...],
               brands: frozenset[CardBrand]) -> None:
    """What `mode: pay` cannot do: Twilio's <Pay> reads nothing back, has one timeout and
    attempt limit for all its fields, and knows no UnionPay."""
    for i, st in enumerate(steps):
        if st.kind == "confirmation":
            c.fail(f"steps[{i}].step", "'confirmation' is not used with mode: pay (<Pay> "
                                       "takes the card itself and reads nothing back)")
        if st.max_attempts > PAY_MAX_ATTEMPTS:
            c.fail(f"steps[{i}].max_attempts", f"must be at most {PAY_MAX_ATTEMPTS} with "
                                               "mode: pay")
        if isinstance(raw, list) and i < len(raw) and isinstance(raw[i], Mapping) and (
                "finish_on_key" in raw[i]):
            c.fail(f"steps[{i}].finish_on_key", "not used with mode: pay (<Pay> ends each "
                                                "field itself)")
    for brand in sorted(brands - PAY_CARD_TYPES.keys()):
        c.fail("accepted_brands", f"{brand.name} cannot be taken with mode: pay (Twilio's "
                                  "<Pay> has no card type for it)")


def _steps(c: _Checker, raw: Any, base: Prompt) -> tuple[Step, ...]:
    if not isinstance(raw, list) or not raw:
        c.fail("steps", "must be a non-empty list")
        return ()
    steps: list[Step] = []
    seen: list[str] = []
    for i, item in enumerate(raw):
        path = f"steps[{i}]"
        m = c.mapping(item, path)
        if m is None:
            continue
        kind = m.get("step")
        if kind not in STEP_ORDER:
            c.fail(f"{path}.step", f"must be one of {', '.join(STEP_ORDER)}")
            continue
        if kind in seen:
            c.fail(f"{path}.step", f"'{kind}' appears twice")
            continue
        if seen and STEP_ORDER.index(kind) < STEP_ORDER.index(seen[-1]):
            c.fail(f"{path}.step", f"must come before '{seen[-1]}' (order: "
                                   f"{', '.join(STEP_ORDER)})")
        seen.append(kind)
        allowed = {"step", "prompt", "timeout", "finish_on_key", "max_attempts", "reprompts"}
        if kind == "postal_code":
            allowed |= {"min_length", "max_length"}
        c.keys(m, path, allowed)
        prompt = (c.prompt(m["prompt"], f"{path}.prompt", base) if "prompt" in m
                  else Prompt(_DEFAULT_PROMPTS[kind], base.voice, base.language))
        if kind == "confirmation" and "{last4}" not in prompt.text:
            c.fail(f"{path}.prompt", "must read back '{last4}' (and may use '{brand}')")
        bad = re.findall(r"\{([^}]*)\}", prompt.text)
        if any(b not in ("brand", "last4") for b in bad) or (bad and kind != "confirmation"):
            c.fail(f"{path}.prompt", "only the confirmation may use placeholders, and only "
                                     "{brand} and {last4}")
        timeout = c.integer(m.get("timeout", 5), f"{path}.timeout", 1, 60)
        finish = m.get("finish_on_key", "#")
        if finish not in _FINISH_KEYS:
            c.fail(f"{path}.finish_on_key", "must be '#', a digit or '' ('*' is re-enter)")
            finish = "#"
        attempts = c.integer(m.get("max_attempts", 3), f"{path}.max_attempts", 1, 5)
        reprompts: dict[str, Prompt] = {
            e: Prompt(_DEFAULT_REPROMPTS[e], base.voice, base.language) for e in ERROR_TYPES[kind]
        }
        if "reprompts" in m:
            r = c.mapping(m["reprompts"], f"{path}.reprompts")
            if r is not None:
                for err, text in r.items():
                    if err not in ERROR_TYPES[kind]:
                        c.fail(f"{path}.reprompts.{err}",
                               f"not an error of this step ({', '.join(ERROR_TYPES[kind])})")
                        continue
                    reprompts[err] = c.prompt(text, f"{path}.reprompts.{err}", base)
        lo = hi = 0
        if kind == "postal_code":
            lo = c.integer(m.get("min_length", 5), f"{path}.min_length", 3, 10)
            hi = c.integer(m.get("max_length", 10), f"{path}.max_length", 3, 10)
            if hi < lo:
                c.fail(f"{path}.max_length", "must be at least min_length")
        steps.append(Step(kind, prompt, timeout, finish, attempts, reprompts, lo, hi))
    for kind in REQUIRED_STEPS:
        if kind not in seen:
            c.fail("steps", f"a '{kind}' step is required")
    return tuple(steps)


def _ending(c: _Checker, raw: Any, path: str, base: Prompt) -> Ending:
    m = c.mapping(raw, path)
    if m is None:
        return Ending(None)
    c.keys(m, path, {"say", "then", "url", "queue"})
    say = c.prompt(m["say"], f"{path}.say", base) if "say" in m else None
    action = m.get("then", "hangup")
    if action not in ENDING_ACTIONS:
        c.fail(f"{path}.then", f"must be one of {', '.join(ENDING_ACTIONS)}")
        action = "hangup"
    url = queue = ""
    if action == "redirect":
        url = c.text(m.get("url"), f"{path}.url")
        if url and not url.startswith(("http://", "https://", "/")):
            c.fail(f"{path}.url", "must be an http(s):// URL or a path starting with '/'")
    elif "url" in m:
        c.fail(f"{path}.url", "only used with 'then: redirect'")
    if action == "enqueue":
        queue = c.text(m.get("queue"), f"{path}.queue")
        if queue and not _QUEUE.match(queue):
            c.fail(f"{path}.queue", "must be 1-64 of A-Z, a-z, 0-9, '_', '.' or '-'")
    elif "queue" in m:
        c.fail(f"{path}.queue", "only used with 'then: enqueue'")
    return Ending(say, action, url, queue)


def load_flow(path: Path) -> Flow:
    """Read and validate one flow file; its name must match the file name."""
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FlowError([f"{source}: (file): cannot be read ({exc.strerror})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(document)"
        raise FlowError([f"{source}: {where}: not valid YAML"]) from None
    flow = parse_flow(data, source)
    if flow.name != path.stem:
        raise FlowError([f"{source}: name: must equal the file name '{path.stem}'"])
    return flow


def load_flows(directory: Path) -> dict[str, Flow]:
    """Every `*.yaml` flow in a directory, by name; all files' problems reported together."""
    flows: dict[str, Flow] = {}
    problems: list[str] = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            flow = load_flow(path)
        except FlowError as exc:
            problems += exc.problems
            continue
        flows[flow.name] = flow
    if problems:
        raise FlowError(problems)
    if not flows:
        raise FlowError([f"{directory}: (directory): no *.yaml flows found"])
    return flows
