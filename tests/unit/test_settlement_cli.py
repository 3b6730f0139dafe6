"""Unit tests for vaultline.cli.settle: the parser, `--help` and the progress display."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from vaultline.cli import settle as cli
from vaultline.cli.settle import _ProgressPrinter, add_settle_commands
from vaultline.config import ConfigError
from vaultline.settlement import DEFAULT_CHUNK, MAX_CHUNK
from vaultline.settlement.batch import check_captures


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
    assert p.parse_args(["settle", "approve", "sb_0123456789", "--input", "x.csv"]).as_ == (
        "settlement-2")
    run = p.parse_args(["settle", "run", "sb_0123456789", "--recipient", "k.asc",
                        "--output", "out"])
    assert (run.as_, run.chunk, run.sign_key) == ("settlement", DEFAULT_CHUNK, None)


@pytest.mark.parametrize("chunk", ["0", "-5", str(MAX_CHUNK + 1)])
def test_run_refuses_a_chunk_size_out_of_range(chunk: str, tmp_path: Path) -> None:
    args = parser().parse_args(["--home", str(tmp_path), "settle", "run", "sb_0123456789",
                                "--recipient", "k.asc", "--output", "out", "--chunk", chunk])
    with pytest.raises(ConfigError, match="--chunk must be between 1 and"):
        args.func(args)


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


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_terminal_bar_updates_in_place_with_rate_and_eta() -> None:
    tty, clock = Tty(), Clock()
    show = _ProgressPrinter(tty, clock=clock)
    clock.now += 10
    show(500, 2000)  # 50 rows/s, 1500 rows to go: 30 s
    clock.now += 0.1
    show(600, 2000)  # within 0.2 s of the last draw: skipped
    clock.now += 10
    show(1000, 2000)  # 50 rows/s, 20 s to go
    first = tty.getvalue()
    assert first.startswith("\r[") and first.count("\r") == 2 and "\n" not in first
    assert "25.0% 500/2000 rows 50 rows/s ETA 0:00:30" in first
    assert "50.0% 1000/2000 rows 50 rows/s ETA 0:00:20" in first
    clock.now += 20
    show(2000, 2000)
    text = tty.getvalue()
    assert text.endswith("ETA 0:00:00 \n") and "[" + "#" * 30 + "] 100.0%" in text
    show(2000, 2000)  # a repeated last call draws nothing more
    assert tty.getvalue() == text


def test_plain_progress_lines_carry_the_rate_and_come_every_interval() -> None:
    plain, clock = io.StringIO(), Clock()
    show = _ProgressPrinter(plain, interval=5.0, clock=clock)
    for _ in range(10):
        clock.now += 1
        show(int((clock.now - 100) * 100), 1000)
    lines = plain.getvalue().splitlines()
    assert lines == [
        "progress: 100/1000 rows (10.0%), 100 rows/s, ETA 0:00:09",  # the first call
        "progress: 600/1000 rows (60.0%), 100 rows/s, ETA 0:00:04",  # 5 s later
        "progress: 1000/1000 rows (100.0%), 100 rows/s, ETA 0:00:00",  # done: always shown
    ]


def test_byte_progress_in_mib_with_a_task_name() -> None:
    tty, clock = Tty(), Clock()
    show = _ProgressPrinter(tty, task="checking", unit="MiB", scale=1 << 20, clock=clock)
    clock.now += 2
    show(3 << 20, 12 << 20)
    assert tty.getvalue().startswith("\rchecking [#######")
    assert "25.0% 3.0/12.0 MiB 1.5 MiB/s ETA 0:00:06" in tty.getvalue()
    show.close()  # stopped early: the bar's line is ended
    assert tty.getvalue().endswith("\n")
    plain = io.StringIO()
    _ProgressPrinter(plain, task="storing", unit="MiB", scale=1 << 20, clock=clock)(
        1 << 19, 1 << 20)
    assert plain.getvalue().startswith("progress: storing 0.5/1.0 MiB (50.0%),")


def test_a_big_capture_file_is_read_in_chunks_with_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "captures.csv"
    token = "tok_" + "A" * 22
    path.write_text("reference,token,amount_minor,currency\n"
                    + "".join(f"r{i},{token},{i + 1},EUR\n" for i in range(1000)))
    monkeypatch.setattr(cli, "_CHUNK", 4096)
    source = cli._file_source(path, "checking")
    assert b"".join(source()) == path.read_bytes()
    assert capsys.readouterr().err == ""  # a small file: no progress
    monkeypatch.setattr(cli, "_PROGRESS_MIN_BYTES", 0)
    checked = check_captures(cli._file_source(path, "checking"))
    assert checked.ok and checked.row_count == 1000
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines and all(line.startswith("progress: checking ") for line in lines)
    assert "MiB (100.0%)" in lines[-1] and "MiB/s" in lines[-1]
    assert token not in err and "r1," not in err  # counts only, never content
