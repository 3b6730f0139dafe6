"""Unit tests for vaultline.settlement.cli: the parser, `--help` and the progress display."""

from __future__ import annotations

import argparse
import io

import pytest

from vaultline.settlement.cli import _ProgressPrinter, add_settle_commands


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vaultline")
    p.add_argument("--home", default=".vaultline")
    add_settle_commands(p.add_subparsers(dest="command", required=True))
    return p


@pytest.mark.parametrize("sub", ["create", "approve", "run", "status", "list"])
def test_every_subcommand_has_help(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        parser().parse_args(["settle", sub, "--help"])
    assert done.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_identities_default_to_two_different_clients() -> None:
    p = parser()
    assert p.parse_args(["settle", "create", "--input", "x.csv"]).as_ == "settlement"
    assert p.parse_args(["settle", "approve", "sb_0123456789"]).as_ == "settlement-2"
    run = p.parse_args(["settle", "run", "sb_0123456789", "--recipient", "k.asc",
                        "--output", "out"])
    assert (run.as_, run.chunk, run.sign_key) == ("settlement", 2000, None)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise() -> None:
    tty = Tty()
    show = _ProgressPrinter(tty)
    show(500, 1000)
    show(1000, 1000)
    assert "\r[" in tty.getvalue() and "rows/s" in tty.getvalue() and "ETA" in tty.getvalue()
    assert tty.getvalue().endswith("\n")
    plain = io.StringIO()
    show = _ProgressPrinter(plain, interval=0)
    show(500, 1000)
    show(1000, 1000)
    lines = plain.getvalue().splitlines()
    assert lines[0].startswith("progress: 500/1000 rows (50.0%)") and len(lines) == 2
    assert "\r" not in plain.getvalue()
