"""The dev-stack wiring (`start_dev_ivr`) and `vaultline sim call` against it."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.infra import PostgresHandle
from vaultline.cli import build_parser
from vaultline.devstack.ivr import stack_info, start_dev_ivr

pytestmark = pytest.mark.integration
FLOWS = Path(__file__).resolve().parents[2] / "ivr_flows"


async def test_sim_call_command_prints_masked_transcript_and_token(
        tmp_path: Path, migrated: PostgresHandle, tokenizer: Any, capsys: Any) -> None:
    dev = tmp_path / "dev"
    running = await start_dev_ivr(dev_dir=dev, database_url=migrated.ivr_dsn,
                                  channel=tokenizer.channel("ivr/ivr-1"), flows_dir=FLOWS)
    try:
        info = stack_info(running, dev)
        assert set(info) >= {"ivr_base_url", "twilio_api_base_url", "twilio_auth_token_file"}
        for name in ("twilio-auth-token", "ivr-session-secret", "ivr-crm-secret"):
            assert stat.S_IMODE((dev / name).stat().st_mode) == 0o600
        (dev / "stack.json").write_text(json.dumps(info))
        args = build_parser().parse_args(["--home", str(tmp_path), "sim", "call", "--flow",
                                          "card_capture", "--card", "4111111111111111",
                                          "--expiry", "1230"])
        code = await asyncio.to_thread(args.func, args)
    finally:
        await running.stop()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "4111111111111111" not in out and "411111" not in out
    # Card, expiry, security code and the read-back's "1": every key while paused.
    assert out.count("caller pressed *   (recording paused)") == 16 + 4 + 3 + 1
    assert "caller pressed #   (recording paused)" in out
    assert "paused (skip)" in out and "card digits pressed while recording: 0" in out
    assert "outcome success: token " in out and "VISA ending 1111" in out
