"""TwiML rendering: interpreter actions -> XML through the twilio package's `VoiceResponse`.

Pure. Never builds XML by hand. Gather posts to `{base}/voice/{flow}/input?seq=N` with
`actionOnEmptyResult=true`, so a timeout reaches the flow (as empty `Digits`) instead of
falling through to the next verb.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlencode

from twilio.twiml.voice_response import Dial, VoiceResponse

from .flows import Prompt
from .interpreter import Action, Conference, Enqueue, Gather, Hangup, Redirect, Say

__all__ = ["absolute_url", "input_url", "render"]


def absolute_url(base_url: str, url: str) -> str:
    """A flow URL: absolute as given, or a path under the public base URL."""
    return base_url.rstrip("/") + url if url.startswith("/") else url


def input_url(base_url: str, flow: str, seq: int) -> str:
    return f"{base_url.rstrip('/')}/voice/{flow}/input?{urlencode({'seq': seq})}"


def _say_kwargs(prompt: Prompt) -> dict[str, str]:
    kwargs = {}
    if prompt.voice:
        kwargs["voice"] = prompt.voice
    if prompt.language:
        kwargs["language"] = prompt.language
    return kwargs


def render(actions: Sequence[Action], *, base_url: str, flow: str) -> str:
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
