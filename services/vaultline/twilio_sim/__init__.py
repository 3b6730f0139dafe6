"""A local Twilio for tests, demos and load: signed webhooks, TwiML, REST, a timeline.

- `signature.sign`: `X-Twilio-Signature` computed from Twilio's documented algorithm (written
  independently of the twilio package, and checked against its test vectors).
- `sim.TwilioSim`: places calls to a webhook with Twilio's parameters, interprets the TwiML
  it gets back, presses digits from a script, serves the REST paths Vaultline calls
  (Calls update, Recordings create/update) and keeps a timeline tests assert on.
"""

from .signature import sign
from .sim import (
    Call,
    Delay,
    Event,
    HangUp,
    Press,
    SimCall,
    Timeout,
    TwilioSim,
    WaitForRedirect,
)

__all__ = ["Call", "Delay", "Event", "HangUp", "Press", "SimCall", "Timeout", "TwilioSim",
           "WaitForRedirect", "sign"]

# The card `vaultline sim call` keys in when none is given: Visa's public test number.
DEMO_CARD = "4111111111111111"
