"""A plain (non-editable) `pip install` of vaultline runs from any directory.

The wheel is built from this checkout and installed into a fresh virtualenv; the virtualenv
borrows the dependencies already installed in the test's own environment (a path line, so
the checkout's editable install is not seen), and the commands run from an empty directory
outside the checkout. Migrations, OpenBao policies, the access policy and the IVR flows
must all come from the installed package.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False,
                          **kwargs)  # type: ignore[call-overload]




def test_a_non_editable_install_runs_the_stack_from_another_directory(
    tmp_path: Path, home: Path
) -> None:
    wheels, venv, cwd = (tmp_path / n for n in ("wheels", "venv", "elsewhere"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-q", "-w", str(wheels), str(REPO)])
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("vaultline-*.whl")
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)]).returncode == 0
    installed = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                      "install", "-q", "--no-deps", str(wheel)])
    assert installed.returncode == 0, installed.stderr
    site = Path(_run([str(venv / "bin" / "python"), "-c",
                      "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    (site / "borrowed-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    cwd.mkdir()
    # What a user's shell has: no VAULTLINE_* settings, no PYTHONPATH into the checkout; the
    # dependencies' executables (OpenBao's `bao`) on PATH, as a venv's bin would put them.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VAULTLINE_") and k != "PYTHONPATH"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    vaultline = [str(venv / "bin" / "vaultline"), "--home", str(home)]

    where = _run([str(venv / "bin" / "python"), "-c",
                  "import vaultline.resources as r; print(r.__file__);"
                  "print(all(p.is_file() and not p.is_symlink() for p in ("
                  "r.ACCESS_POLICY, r.OPENBAO_DIR / 'tokenizer.hcl',"
                  " r.MIGRATIONS_DIR / '0001_vault.sql', r.IVR_FLOWS_DIR / 'card_capture.yaml')))"],
                 cwd=cwd, env=env)
    module, packaged = where.stdout.split()
    assert Path(module).is_relative_to(venv) and packaged == "True", where.stdout + where.stderr

    log = (tmp_path / "dev-up.log").open("w")
    up = subprocess.Popen([*vaultline, "dev", "up", "--grpc-port", "0"], cwd=cwd, env=env,
                          stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        stack_file = home / "dev" / "stack.json"
        deadline = time.monotonic() + 120
        while not stack_file.exists():
            assert up.poll() is None, (tmp_path / "dev-up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "dev up did not write stack.json in 120 s"
            time.sleep(0.2)
        info = json.loads(stack_file.read_text())
        assert info["migrations_applied"], "the packaged migrations were applied"

        migrate = _run([*vaultline, "db", "migrate"], cwd=cwd, env=env)
        assert migrate.returncode == 0, migrate.stderr
        assert "nothing (up to date)" in migrate.stdout

        call = _run([*vaultline, "sim", "call", "--flow", "card_capture"], cwd=cwd, env=env)
        assert call.returncode == 0, call.stdout + call.stderr
        assert "outcome success: token" in call.stdout
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "dev-up.log").read_text()[-3000:]
    assert not any(cwd.iterdir()), "nothing is written to the working directory"
