"""`X-Twilio-Signature`, from Twilio's documented algorithm (webhook security page).

The full URL (query included), then for form posts each parameter name followed by its
value(s), names sorted, repeated values sorted, no separators; HMAC-SHA1 keyed with the Auth
Token; base64. Deliberately not the twilio package's code, so tests compare two
implementations (and the package's own test vector) rather than one with itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable

__all__ = ["sign"]


def sign(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    pairs = list(params)
    data = url
    for name in sorted({n for n, _ in pairs}):
        for value in sorted({v for n, v in pairs if n == name}):
            data += name + value
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()
