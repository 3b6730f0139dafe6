"""`vaultline dev up --ha` (issue 19): OpenBao as a 3-node Raft cluster, every node unsealed,
the whole stack (tokenizer, IVR, admin commands) given every node; stack.json lists the nodes
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
        assert [n["kind"] for n in nodes] == ["openbao"] * 3
        assert sorted(n["role"] for n in nodes) == ["follower", "follower", "leader"]
        assert all(_alive(n["pid"]) for n in nodes)
        assert info["vault_addr"] == ",".join(n["address"] for n in nodes)
        # The admin commands and a whole call go through the cluster.
        keys = subprocess.run([*VAULTLINE, "--home", str(home), "keys", "status"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert keys.returncode == 0, keys.stderr
        call = subprocess.run([*VAULTLINE, "--home", str(home), "sim", "call", "--flow",
                               "card_capture"], capture_output=True, text=True, timeout=120,
                              check=False)
        assert call.returncode == 0 and "token" in call.stdout, call.stdout[-2000:]
        assert "3-node Raft cluster" in stack.output
    finally:
        assert stack.interrupt() == 0, stack.output[-3000:]
    assert not any(_alive(n["pid"]) for n in nodes)
