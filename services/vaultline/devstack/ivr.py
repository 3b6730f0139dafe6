"""Dev stack wiring for the IVR: the webhook service plus the simulator's REST side.

`start_dev_ivr` is what `vaultline dev up` calls: the twilio client is pointed at the
simulator, every flow's CRM callback at the simulator's demo CRM sink, and the dev-only
secrets (Twilio auth token, session secret, CRM signing secret) are 0600 files in `dev_dir`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from ..ivr.app import IvrConfig, RunningIvr, start_ivr
from ..ivr.connector import ConnectorCredentials
from ..ivr.flows import load_flows
from ..resources import IVR_FLOWS_DIR
from ..twilio_sim import TwilioSim
from ..twilio_sim.payments import ConnectorConfig
from ..vault import RECORDINGS_KEY, AppRoleCredentials, TransitClient
from . import free_port

__all__ = ["CONNECTOR_FILE", "start_dev_ivr", "stack_info"]

CONNECTOR_FILE = "pay-connector.json"  # the Generic Pay Connector's HTTP Basic credentials
# The dev tenants accept every brand the vault knows (Twilio's default is visa mastercard amex).
DEV_CARD_TYPES = "visa mastercard amex discover jcb diners-club maestro unionpay"


def _secret_file(path: Path, make: bytes) -> bytes:
    """The file's bytes, creating it 0600 with `make` first if it does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(make)
    return path.read_bytes()


async def start_dev_ivr(*, dev_dir: Path, database_url: str, channel: grpc.aio.Channel,
                        flows_dir: Path = IVR_FLOWS_DIR, host: str = "127.0.0.1",
                        port: int = 0, sim_port: int = 0, recordings_dir: Path | None = None,
                        vault_addr: str = "", recordings_approle: Path | None = None
                        ) -> RunningIvr:
    """Simulator REST side + webhook service on loopback; `stack_info()` for stack.json.
    With `recordings_approle`, the recording vault is on: OpenBao's recording key is
    registered with the simulated account (as `vaultline recordings public-key` output is
    with Twilio), and its recording status callbacks reach the IVR's ingest."""
    sim = TwilioSim()
    await sim.start(host, sim_port)
    try:
        token_file = dev_dir / "twilio-auth-token"
        token_file.unlink(missing_ok=True)  # a fresh simulator account per run
        sim.auth_token = _secret_file(token_file, secrets.token_hex(16).encode()).decode()
        session_secret = _secret_file(dev_dir / "ivr-session-secret", os.urandom(32))
        crm_secret = _secret_file(dev_dir / "ivr-crm-secret", os.urandom(32))
        connector_file = dev_dir / CONNECTOR_FILE
        _secret_file(connector_file, json.dumps(
            {"username": "twilio", "password": secrets.token_urlsafe(24)}).encode())
        port = port or free_port(host)
        base = f"http://{host}:{port}"
        flows = load_flows(flows_dir)
        config = IvrConfig(
            public_base_url=base, account_sid=sim.account_sid, auth_token=sim.auth_token,
            database_url=database_url, session_secret=session_secret, crm_secret=crm_secret,
            flows_dir=flows_dir, twilio_api_base_url=sim.rest_base_url,
            crm_callback_urls={name: sim.rest_base_url + "/_sim/crm" for name in flows},
            connector_credentials=ConnectorCredentials.from_file(connector_file),
            capture_crm_callback_url=sim.rest_base_url + "/_sim/crm",
            card_types={tenant: DEV_CARD_TYPES for tenant in ("default", "demo")},
            recordings_dir=recordings_dir if recordings_approle else None,
            metrics_listen=f"{host}:0",
            recordings_vault_addr=vault_addr,
            recordings_credentials=(AppRoleCredentials.from_file(recordings_approle)
                                    if recordings_approle else None),
        )
        # The simulated Twilio account's Pay Connector points at the webhook's endpoint.
        creds = config.connector_credentials
        assert creds is not None
        sim.payments.connectors[config.pay_connector_name] = ConnectorConfig(
            base + "/pay/connector", creds.username, creds.password)
        running = await start_ivr(config, channel, host=host, port=port, flows=flows)
        if config.recordings_credentials is not None:
            await _register_recording_key(sim, config, base)
    except BaseException:
        await sim.stop()
        raise
    running.sim = sim
    return running


async def _register_recording_key(sim: TwilioSim, config: IvrConfig, base: str) -> None:
    """The public half of OpenBao's recording key, registered with the simulated account
    (Twilio's Credentials/PublicKeys), and the account's recording status callback set."""
    assert config.recordings_credentials is not None
    with TransitClient(config.recordings_vault_addr, config.recordings_credentials,
                       key_name=RECORDINGS_KEY) as keys:
        _, pem = await asyncio.to_thread(keys.public_key_pem)
    auth = aiohttp.BasicAuth(sim.account_sid, sim.auth_token)
    async with aiohttp.ClientSession() as http, http.post(
            sim.rest_base_url + "/v1/Credentials/PublicKeys", auth=auth,
            data={"PublicKey": pem, "FriendlyName": "vaultline-recordings"}) as response:
        if response.status != 201:
            raise RuntimeError(f"the simulator refused the recording key ({response.status})")
    sim.recordings.status_callback = base + "/recordings/status"


def stack_info(running: RunningIvr, dev_dir: Path) -> dict[str, Any]:
    """The keys the IVR adds to `.vaultline/dev/stack.json`."""
    return {
        "ivr_base_url": running.ivr_base_url,
        "twilio_api_base_url": running.service.config.twilio_api_base_url,
        "twilio_auth_token_file": str(dev_dir / "twilio-auth-token"),
        "twilio_account_sid": running.service.config.account_sid,
        "pay_connector_url": running.ivr_base_url.rstrip("/") + "/pay/connector",
        "pay_connector_credentials_file": str(dev_dir / CONNECTOR_FILE),
        **({"recordings_dir": str(running.service.config.recordings_dir)}
           if running.service.config.recordings_dir is not None else {}),
        "ivr_metrics_address": running.service.metrics_address,
    }
