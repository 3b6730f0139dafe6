"""TwiML rendering: interpreter actions -> XML through the twilio package's `VoiceResponse`.

Pure. Never builds XML by hand. Gather posts to `{base}/voice/{flow}/input?seq=N` with
`actionOnEmptyResult=true`, so a timeout reaches the flow (as empty `Digits`) instead of
falling through to the next verb. <Pay> (`mode: pay`) posts its Result to
`{base}/voice/{flow}/pay?seq=N`; it names the Pay Connector, tokenizes only
(`chargeAmount=0`, a reusable token) and passes the flow's tenant to the connector as the
`vaultline_tenant` parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlencode

from twilio.twiml.voice_response import Dial, VoiceResponse

from .flows import Prompt
from .interpreter import Action, Conference, Enqueue, Gather, Hangup, Pay, Redirect, Say
from .pay_connector import TENANT_PARAMETER

__all__ = ["absolute_url", "input_url", "pay_url", "render"]


def absolute_url(base_url: str, url: str) -> str:
    """A flow URL: absolute as given, or a path under the public base URL."""
    return base_url.rstrip("/") + url if url.startswith("/") else url


def input_url(base_url: str, flow: str, seq: int) -> str:
    return f"{base_url.rstrip('/')}/voice/{flow}/input?{urlencode({'seq': seq})}"


def pay_url(base_url: str, flow: str, seq: int) -> str:
    return f"{base_url.rstrip('/')}/voice/{flow}/pay?{urlencode({'seq': seq})}"


def _say_kwargs(prompt: Prompt) -> dict[str, str]:
    kwargs = {}
    if prompt.voice:
        kwargs["voice"] = prompt.voice
    if prompt.language:
        kwargs["language"] = prompt.language
    return kwargs


def render(actions: Sequence[Action], *, base_url: str, flow: str,
           pay_connector: str = "vaultline") -> str:
    """The TwiML document for one webhook answer."""
    response = VoiceResponse()
    for action in actions:
        if isinstance(action, Say):
            response.say(action.prompt.text, **_say_kwargs(action.prompt))
        elif isinstance(action, Gather):
            kwargs: dict[str, object] = {
                "input": "dtmf",
                "action": input_url(base_url, flow, action.seq),
                "method": "POST",
                "timeout": action.timeout,
                "finish_on_key": action.finish_on_key,
                "action_on_empty_result": True,
            }
            if action.num_digits:
                kwargs["num_digits"] = action.num_digits
            gather = response.gather(**kwargs)
            for prompt in action.prompts:
                gather.say(prompt.text, **_say_kwargs(prompt))
        elif isinstance(action, Pay):
            for prompt in action.lead:
                response.say(prompt.text, **_say_kwargs(prompt))
            pay_kwargs: dict[str, object] = {
                "input": "dtmf",
                "action": pay_url(base_url, flow, action.seq),
                "payment_connector": pay_connector,
                "token_type": "reusable",
                "charge_amount": "0",
                "payment_method": "credit-card",
                "security_code": action.security_code,
                "postal_code": action.postal_code,
                "valid_card_types": " ".join(action.card_types),
                "timeout": action.timeout,
                "max_attempts": action.max_attempts,
            }
            if action.postal_code and action.min_postal_code_length:
                pay_kwargs["min_postal_code_length"] = action.min_postal_code_length
            pay = response.pay(**pay_kwargs)
            for field in action.fields:
                pay.prompt(for_=field.name).say(field.prompt.text, **_say_kwargs(field.prompt))
                for error, prompt in field.reprompts:
                    pay.prompt(for_=field.name, error_type=error).say(
                        prompt.text, **_say_kwargs(prompt))
            pay.parameter(name=TENANT_PARAMETER, value=action.tenant)
        elif isinstance(action, Redirect):
            response.redirect(absolute_url(base_url, action.url), method="POST")
        elif isinstance(action, Enqueue):
            response.enqueue(action.queue)
        elif isinstance(action, Conference):
            dial = Dial()
            dial.conference(action.name)
            response.append(dial)
        elif isinstance(action, Hangup):
            response.hangup()
    return str(response)


def empty() -> str:
    return str(VoiceResponse())
