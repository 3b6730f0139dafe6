"""`vaultline dev up --ha` (issue 19): OpenBao as a 3-node Raft cluster, every node unsealed;
PostgreSQL as a primary and a synchronous standby under Patroni on three etcd members; the
whole stack (tokenizer, IVR, admin commands) given every node; stack.json lists the nodes
under `ha`; Ctrl-C stops every process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.fixtures.devstack import VAULTLINE, Stack

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_dev_up_ha(home: Path) -> None:
    stack = Stack(home, args=("--ha",))
    info = stack.up()
    try:
        nodes = info["ha"]["nodes"]
        kinds = {kind: [n for n in nodes if n["kind"] == kind]
                 for kind in ("openbao", "postgresql", "etcd")}
        assert [len(v) for v in kinds.values()] == [3, 2, 3] and len(nodes) == 8
        assert sorted(n["role"] for n in kinds["openbao"]) == ["follower", "follower", "leader"]
        assert sorted(n["role"] for n in kinds["postgresql"]) == ["primary", "sync_standby"]
        assert all(_alive(n["pid"]) for n in nodes)
        assert all(_alive(n["patroni_pid"]) for n in kinds["postgresql"])
        assert info["vault_addr"] == ",".join(n["address"] for n in kinds["openbao"])
        hosts = ",".join(n["address"] for n in kinds["postgresql"])
        assert f"@{hosts}/vaultline?target_session_attrs=read-write" in info["database_url"]
        # The admin commands and a whole call go through the cluster.
        keys = subprocess.run([*VAULTLINE, "--home", str(home), "keys", "status"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert keys.returncode == 0, keys.stderr
        call = subprocess.run([*VAULTLINE, "--home", str(home), "sim", "call", "--flow",
                               "card_capture"], capture_output=True, text=True, timeout=120,
                              check=False)
        assert call.returncode == 0 and "token" in call.stdout, call.stdout[-2000:]
        assert "3-node Raft cluster" in stack.output and "under Patroni" in stack.output
        audit = subprocess.run([*VAULTLINE, "--home", str(home), "audit", "verify"],
                               capture_output=True, text=True, timeout=60, check=False)
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        assert stack.interrupt() == 0, stack.output[-3000:]
    pids = [n["pid"] for n in nodes] + [n["patroni_pid"] for n in kinds["postgresql"]]
    assert not any(_alive(pid) for pid in pids)
