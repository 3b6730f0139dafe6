"""Secure payment IVR, Gather mode: declarative flows, a sans-IO interpreter and its edges.

    flows.py        flow model; YAML loading and validation (errors name file and field)  (pure)
    interpreter.py  step(state, event) -> (state, TwiML actions, one side effect)          (pure)
    twiml.py        actions -> TwiML through twilio's VoiceResponse                        (pure)
    sealing.py      interim card fields sealed under a per-call key (HKDF of a secret)     (pure)
    signing.py      Vaultline-Signature (HMAC-SHA-256, Stripe-style) for CRM callbacks     (pure)
    twilio_rest.py  recording pause/resume and call redirects through the twilio client
    tokenizer.py    TokenizationService.Tokenize over a caller-built grpc.aio.Channel
    crm.py          signed CRM callbacks with retries and a unique event id
    app.py          the aiohttp webhook service (signature checks, sessions, effects)

The SQL for sessions lives in `vaultline.ivr_store` (see its docstring for why not here); the
commands `vaultline ivr serve` and `vaultline sim call` in `vaultline.cli.ivr`, the dev stack's
wiring to the Twilio simulator in `vaultline.devstack.ivr`.
"""
