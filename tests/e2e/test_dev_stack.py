"""The stack as `make run` starts it (`vaultline dev up`), driven over gRPC from this process.

Also: Ctrl-C stops everything cleanly, a restart keeps every token, and the key CLI works
against the running stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.fixtures.devstack import VAULTLINE, Stack, stack_channel
from tests.testcards import TEST_CARDS
from vaultline.gen.admin.v1 import admin_pb2 as admin_pb
from vaultline.gen.admin.v1 import admin_service_pb2_grpc as admin_grpc
from vaultline.gen.tokenization.v1 import tokenization_pb2 as pb
from vaultline.gen.tokenization.v1 import tokenization_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]



def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VAULTLINE, "--home", str(home), *args],
                          capture_output=True, text=True, timeout=120)


def test_make_run_stack_end_to_end(home: Path) -> None:
    stack = Stack(home)
    info = stack.up()
    try:
        assert {"grpc_address", "vault_addr", "database_url", "ivr_database_url",
                "auditor_database_url", "keys_database_url", "pay_connector_url",
                "pay_connector_credentials_file"} <= info.keys()
        connector_file = Path(info["pay_connector_credentials_file"])
        assert connector_file.stat().st_mode & 0o077 == 0  # the connector's password
        assert info["pay_connector_url"] == info["ivr_base_url"].rstrip("/") + "/pay/connector"
        assert info["grpc_address"].startswith("127.0.0.1:")
        # Unseal material is kept, dev-only and labelled so, and private.
        init_file = home / "dev" / "openbao-init.json"
        assert "DEV ONLY" in init_file.read_text()
        assert init_file.stat().st_mode & 0o077 == 0

        assert set(info["clients"]) >= {"ivr", "intake", "crm", "payments", "settlement",
                                        "settlement-2", "admin"}
        pans = [p for pans in TEST_CARDS.values() for p in pans[:1]]
        with stack_channel(info, "intake") as intake, stack_channel(info, "crm") as crm, \
                stack_channel(info, "settlement") as settlement:
            health = health_pb2_grpc.HealthStub(crm).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.TokenizationServiceStub(intake)
            tokens = [
                stub.Tokenize(pb.TokenizeRequest(card=pb.Card(
                    pan=p, expiry_month=11, expiry_year=2032))).token.token
                for p in pans
            ]
            reveal = pb_grpc.TokenizationServiceStub(settlement)
            for pan, token in zip(pans, tokens, strict=True):
                got = reveal.Detokenize(pb.DetokenizeRequest(token=token, purpose="e2e"))
                assert got.card.pan == pan
            # The CRM role never sees a card number, nor may it tokenize (an oracle).
            crm_stub = pb_grpc.TokenizationServiceStub(crm)
            with pytest.raises(grpc.RpcError) as denied:
                crm_stub.Detokenize(pb.DetokenizeRequest(token=tokens[0], purpose="e2e"))
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as denied:
                crm_stub.Tokenize(pb.TokenizeRequest(card=pb.Card(
                    pan=pans[0], expiry_month=11, expiry_year=2032)))
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Without a client certificate there is no connection at all.
        with grpc.secure_channel(info["grpc_address"], grpc.ssl_channel_credentials(
                Path(info["ca"]).read_bytes())) as anonymous, pytest.raises(grpc.RpcError):
            pb_grpc.TokenizationServiceStub(anonymous).GetToken(
                pb.GetTokenRequest(token=tokens[0]), timeout=5)
        verify = _cli(home, "audit", "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr

        status = _cli(home, "keys", "status", "--json")
        assert status.returncode == 0, status.stderr
        before = json.loads(status.stdout)["kek"]["latest_version"]
        rotate = _cli(home, "keys", "rotate")
        assert rotate.returncode == 0, rotate.stderr
        after = json.loads(_cli(home, "keys", "status", "--json").stdout)
        assert after["kek"]["latest_version"] == before + 1
        assert {d["kek_version"] for d in after["data_keys"]} == {before + 1}
    finally:
        code = stack.interrupt()
    assert code == 0, stack.output
    assert "stopped cleanly" in stack.output
    assert not (home / "dev" / "stack.json").exists()
    for pan in pans:
        assert pan not in stack.output

    # Start again: every token is still there and still detokenizes (after the rotation too).
    stack2 = Stack(home)
    info2 = stack2.up()
    try:
        with stack_channel(info2, "intake") as intake, \
                stack_channel(info2, "settlement") as settlement:
            stub = pb_grpc.TokenizationServiceStub(intake)
            reveal = pb_grpc.TokenizationServiceStub(settlement)
            for pan, token in zip(pans, tokens, strict=True):
                assert reveal.Detokenize(
                    pb.DetokenizeRequest(token=token, purpose="e2e")).card.pan == pan
                again = stub.Tokenize(pb.TokenizeRequest(card=pb.Card(
                    pan=pan, expiry_month=11, expiry_year=2032)))
                assert again.token.token == token and not again.created
    finally:
        assert stack2.interrupt() == 0, stack2.output


def test_cli_help_and_config_errors(home: Path) -> None:
    for args in (["--help"], ["dev", "up", "--help"], ["keys", "rotate", "--help"],
                 ["serve", "--help"], ["db", "migrate", "--help"]):
        result = _cli(home, *args)
        assert result.returncode == 0 and "usage:" in result.stdout
    missing = _cli(home, "keys", "status")
    assert missing.returncode == 2
    assert "VAULTLINE_VAULT_ADDR" in missing.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAULTLINE_")}
    serve = subprocess.run([*VAULTLINE, "serve"], capture_output=True, text=True, env=env,
                           timeout=60)
    assert serve.returncode == 2 and "VAULTLINE_" in serve.stderr
    # The dev stack reads the tokenizer's tuning as `serve` does, and refuses a bad value
    # before it starts anything.
    bad = subprocess.run([*VAULTLINE, "--home", str(home), "dev", "up"], capture_output=True,
                         text=True, env={**env, "VAULTLINE_COMMIT_DELAY_MS": "fast"}, timeout=60)
    assert bad.returncode == 2 and "VAULTLINE_COMMIT_DELAY_MS" in bad.stderr
    assert not (home / "openbao").exists() and not (home / "postgres").exists()


def test_external_openbao_and_postgres(home: Path, openbao, migrated) -> None:  # type: ignore[no-untyped-def]
    """VAULTLINE_VAULT_ADDR / VAULTLINE_DATABASE_URL (+ credentials) replace the embedded
    servers: nothing is started for them, and tokens land in the external database."""
    stack = Stack(home, env={
        "VAULTLINE_VAULT_ADDR": openbao.addr,
        "VAULTLINE_VAULT_ROLE_ID": openbao.tokenizer.role_id,
        "VAULTLINE_VAULT_SECRET_ID": openbao.tokenizer.secret_id,
        "VAULTLINE_DATABASE_URL": migrated.app_dsn,
        "VAULTLINE_DATABASE_OWNER_URL": migrated.owner_dsn,
        "VAULTLINE_IVR_DATABASE_URL": migrated.ivr_dsn,
        "VAULTLINE_COMMIT_DELAY_MS": "6",
    })
    info = stack.up()
    try:
        # The tuning variables reach the tokenizer: it starts at half the longest wait.
        with urllib.request.urlopen(f"http://{info['metrics_address']}/metrics") as response:
            metrics = response.read().decode()
        assert "\nvaultline_commit_delay_seconds 0.003\n" in metrics
        assert info["vault_addr"] == openbao.addr
        assert info["database_url"] == migrated.app_dsn
        assert not (home / "openbao").exists() and not (home / "postgres").exists()
        with stack_channel(info, "intake") as intake:
            token = pb_grpc.TokenizationServiceStub(intake).Tokenize(pb.TokenizeRequest(
                tenant="demo", card=pb.Card(
                    pan="6011111111111117", expiry_month=1, expiry_year=2034))).token.token
        with stack_channel(info, "settlement") as settlement:
            got = pb_grpc.TokenizationServiceStub(settlement).Detokenize(
                pb.DetokenizeRequest(tenant="demo", token=token, purpose="e2e"))
        assert got.card.pan == "6011111111111117"
    finally:
        assert stack.interrupt() == 0, stack.output


def _readme_command(marker: str) -> str:
    """The README's shell command that contains `marker`, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    for block in text.split("```sh\n")[1:]:
        command = block.split("```", 1)[0].replace("\\\n", " ")
        if marker in command:
            return command.strip()
    raise AssertionError(f"no `{marker}` command in README.md")


def test_a_second_dev_up_leaves_the_running_stack_alone_and_the_readme_calls_it(
    home: Path,
) -> None:
    stack = Stack(home)
    info = stack.up()
    try:
        stack_json = (home / "dev" / "stack.json").read_text()
        second = _cli(home, "dev", "up", "--grpc-port", "0")
        assert second.returncode == 1
        assert "already running" in second.stderr and str(home) in second.stderr
        # Nothing of the first stack was touched: its description, servers and data stay.
        assert (home / "dev" / "stack.json").read_text() == stack_json
        with stack_channel(info, "crm") as crm:
            health = health_pb2_grpc.HealthStub(crm).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        # The tokenizer process holds no keys-admin credentials (issue 14): key rotation is
        # the admin CLI's, which reads them from stack.json.
        with stack_channel(info, "admin") as admin, pytest.raises(grpc.RpcError) as refused:
            admin_grpc.KeyServiceStub(admin).GetKeyStatus(admin_pb.GetKeyStatusRequest())
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert info["credentials"]["keys_admin_approle"]

        # The README's `buf curl` example, as written but for this stack's home and port.
        buf = REPO / ".tools" / "node_modules" / ".bin" / "buf"
        if not buf.exists():
            pytest.skip("buf is installed by `make test` (the proto target)")
        command = (_readme_command("buf curl")
                   .replace("cd .vaultline/pki", f"cd {home}/pki")
                   .replace("../../.tools/node_modules/.bin/buf", str(buf))
                   .replace("127.0.0.1:50051", info["grpc_address"]))
        curl = subprocess.run(["/bin/bash", "-c", command], capture_output=True, text=True,
                              timeout=60)
        assert curl.returncode == 0, curl.stderr
        answer = json.loads(curl.stdout)
        assert answer["token"]["last4"] == "1111" and answer["token"]["brand"] == "CARD_BRAND_VISA"
        assert "4111111111111111" not in curl.stdout

        # `vaultline tenant shred` goes through the admin API as the admin identity.
        with stack_channel(info, "intake") as intake:
            pb_grpc.TokenizationServiceStub(intake).Tokenize(pb.TokenizeRequest(
                tenant="demo", card=pb.Card(pan="6011111111111117", expiry_month=1,
                                            expiry_year=2034)))
        unconfirmed = _cli(home, "tenant", "shred", "demo")
        assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
        shred = _cli(home, "tenant", "shred", "demo", "--yes")
        assert shred.returncode == 0, shred.stderr
        assert "data keys destroyed, 1 tokens deleted" in shred.stdout
    finally:
        assert stack.interrupt() == 0, stack.output
    assert "already running" not in stack.output
