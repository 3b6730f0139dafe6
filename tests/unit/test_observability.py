"""Unit tests for vaultline.observability: JSON log lines, PAN masking of every log record field,
metrics exposition over real HTTP, and the metric label guard."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.testcards import ALL_TEST_PANS
from vaultline.api.context import CallContext, current_call
from vaultline.card import luhn_valid, mask_pans
from vaultline.commit_delay import CommitDelay
from vaultline.observability import (
    REDACTED_LABEL,
    JsonFormatter,
    Metrics,
    PanMaskingFilter,
    _safe_label,
    setup_logging,
    start_metrics_server,
    stop_metrics_server,
)

PANS = ["4111111111111111", "5555555555554444", "378282246310005"]  # Visa, Mastercard, Amex
ORDER_ID = "4111111111111112"  # a PAN plus one: fails Luhn, so it is not card data
SETTLEMENT = "spiffe://vaultline/settlement/settlement-1"
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")

log = logging.getLogger("vaultline.test.observability")


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """setup_logging() into a buffer; the root logger is restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    setup_logging("DEBUG", stream=stream)
    yield stream
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
def in_call() -> Iterator[CallContext]:
    call = CallContext(
        method="Detokenize", request_id="req-42", peer="ipv4:127.0.0.1:1", identity=SETTLEMENT
    )
    token = current_call.set(call)
    yield call
    current_call.reset(token)


# ---- JSON lines ------------------------------------------------------------------------------


def test_line_outside_a_call_has_null_request_id(out: io.StringIO) -> None:
    log.info("started %d workers", 4)
    (line,) = lines(out)
    assert TS.match(line["ts"])
    assert line["level"] == "INFO"
    assert line["logger"] == "vaultline.test.observability"
    assert line["msg"] == "started 4 workers"
    assert "request_id" in line and line["request_id"] is None
    assert line["method"] is None and line["identity"] is None
    assert "exc" not in line


def test_line_inside_a_call_carries_its_context(out: io.StringIO, in_call: CallContext) -> None:
    log.warning("quota near")
    (line,) = lines(out)
    assert line["request_id"] == "req-42"
    assert line["method"] == "Detokenize"
    assert line["identity"] == SETTLEMENT


def test_anonymous_call_has_null_identity(out: io.StringIO) -> None:
    token = current_call.set(CallContext(method="Tokenize", request_id="r1", peer="p"))
    try:
        log.info("x")
    finally:
        current_call.reset(token)
    (line,) = lines(out)
    assert line["request_id"] == "r1" and line["identity"] is None


def test_extra_fields_are_added_and_cannot_override_core_keys(out: io.StringIO) -> None:
    log.info("batch", extra={"count": 3, "tenant": "acme", "request_id": "forged"})
    (line,) = lines(out)
    assert line["count"] == 3 and line["tenant"] == "acme"
    assert line["request_id"] is None


def test_every_record_is_one_line(out: io.StringIO) -> None:
    log.info("two\nlines \u2028 and a separator")
    assert len(out.getvalue().splitlines()) == 1
    assert lines(out)[0]["msg"] == "two\nlines \u2028 and a separator"


def test_exception_is_in_exc(out: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    (line,) = lines(out)
    assert line["level"] == "ERROR"
    assert line["exc"].startswith("Traceback (most recent call last):")
    assert line["exc"].endswith("RuntimeError: boom")


def test_setup_is_idempotent(out: io.StringIO) -> None:
    root = logging.getLogger()
    foreign = logging.NullHandler()
    root.addHandler(foreign)
    count = len(root.handlers)
    second = io.StringIO()
    setup_logging("info", stream=second)
    setup_logging("INFO", stream=second)
    assert len(root.handlers) == count
    assert foreign in root.handlers
    assert root.level == logging.INFO
    log.info("once")
    log.debug("filtered out")
    assert out.getvalue() == ""
    assert [line["msg"] for line in lines(second)] == ["once"]


def test_text_lines_carry_the_request_id(out: io.StringIO, in_call: CallContext) -> None:
    text = io.StringIO()
    setup_logging(stream=text, json_lines=False)
    log.info("card %s", PANS[0])
    line = text.getvalue()
    assert "[req-42]" in line and line.rstrip().endswith("card 411111******1111")


# ---- PAN masking -----------------------------------------------------------------------------


def assert_masked(stream: io.StringIO, pan: str) -> None:
    text = stream.getvalue()
    assert text
    assert pan not in text
    assert mask_pans(pan) in text  # BIN and last four stay, for debugging


@pytest.mark.parametrize("pan", PANS)
def test_pan_in_message(out: io.StringIO, pan: str) -> None:
    log.info(f"card {pan} refused")
    assert_masked(out, pan)


@pytest.mark.parametrize("pan", PANS)
def test_pan_in_args(out: io.StringIO, pan: str) -> None:
    log.info("card %s refused after %d tries", pan, 3)
    assert_masked(out, pan)
    assert lines(out)[0]["msg"].endswith("after 3 tries")


@pytest.mark.parametrize("pan", PANS)
def test_pan_in_mapping_args(out: io.StringIO, pan: str) -> None:
    log.info("card %(pan)s", {"pan": pan})
    assert_masked(out, pan)


@pytest.mark.parametrize("pan", PANS)
def test_pan_in_containers_passed_as_args(out: io.StringIO, pan: str) -> None:
    log.info("request %s / %r / %s", {"card": {"pan": pan}}, [pan, 1], (int(pan),))
    assert pan not in out.getvalue()


@pytest.mark.parametrize("pan", PANS)
def test_pan_in_extra(out: io.StringIO, pan: str) -> None:
    log.info(
        "tokenize",
        extra={"pan": pan, "card": {"number": pan, "list": [pan, {"n": int(pan)}]}, "n": int(pan)},
    )
    assert_masked(out, pan)
    line = lines(out)[0]
    assert line["card"]["list"][0] == mask_pans(pan)


@pytest.mark.parametrize("pan", PANS)
def test_pan_in_exception_and_traceback(out: io.StringIO, pan: str) -> None:
    def parse(raw: str) -> None:
        raise ValueError(f"bad card {raw}")

    try:
        try:
            parse(pan)
        except ValueError as exc:
            raise RuntimeError(f"tokenize failed for {pan}") from exc
    except RuntimeError:
        log.exception("call failed")
    assert_masked(out, pan)
    traceback = lines(out)[0]["exc"]
    assert "ValueError: bad card" in traceback and "RuntimeError: tokenize failed" in traceback


def test_pan_in_request_id_and_spaced_pan(out: io.StringIO) -> None:
    token = current_call.set(CallContext(method="Tokenize", request_id=PANS[0], peer="p"))
    try:
        log.info("card 4111 1111 1111 1111 and 5555-5555-5555-4444")
    finally:
        current_call.reset(token)
    text = out.getvalue()
    assert PANS[0] not in text
    assert "1111 1111 1111" not in text and "5555-5555-5555-4444" not in text


def test_every_test_card_is_masked(out: io.StringIO) -> None:
    log.info("cards %s", " ".join(ALL_TEST_PANS))
    text = out.getvalue()
    assert not any(pan in text for pan in ALL_TEST_PANS)


def test_non_luhn_numbers_are_left_alone(out: io.StringIO) -> None:
    assert not luhn_valid(ORDER_ID)
    log.info("order %s", ORDER_ID, extra={"order": int(ORDER_ID), "ref": "1234567890123"})
    line = lines(out)[0]
    assert line["msg"] == f"order {ORDER_ID}"
    assert line["order"] == int(ORDER_ID) and line["ref"] == "1234567890123"


def test_filter_rewrites_the_record_in_place() -> None:
    pan = PANS[0]
    try:
        raise ValueError(pan)
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "card %s", (pan,), exc_info)
    record.stack_info = f"Stack (most recent call last):\n  card = {pan}"
    record.__dict__["card"] = [pan]  # as extra= would set it
    assert PanMaskingFilter().filter(record) is True
    assert record.msg == f"card {mask_pans(pan)}" and not record.args
    assert record.exc_info is None  # no later formatter can render the raw exception
    assert record.exc_text is not None and record.exc_text.endswith(f"ValueError: {mask_pans(pan)}")
    assert pan not in record.stack_info
    assert record.__dict__["card"] == [mask_pans(pan)]
    # Handlers without the filter now see the masked record too.
    assert pan not in logging.Formatter().format(record)
    assert pan not in JsonFormatter().format(record)


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_odd_extra_values_are_logged_not_raised(out: io.StringIO) -> None:
    pan = PANS[0]
    log.info("odd", extra={"by_pair": {(pan, 1): pan}, "obj": Unprintable(), "cards": {pan}})
    line = lines(out)[0]
    assert pan not in out.getvalue()
    assert line["obj"] == "<unprintable>" and line["cards"] == [mask_pans(pan)]


class Hostile(dict[str, str]):
    def items(self) -> Any:
        raise RuntimeError("no")


def test_a_record_that_cannot_be_masked_is_withheld(out: io.StringIO) -> None:
    log.info("card %s", PANS[0], extra={"bad": Hostile(), "pan": PANS[0]})
    line = lines(out)[0]
    assert line["msg"] == "log record withheld: PAN masking failed"
    assert PANS[0] not in out.getvalue() and "bad" not in line


def test_filter_survives_a_bad_format_string() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d %s", (PANS[0],), None)
    assert PanMaskingFilter().filter(record) is True
    assert PANS[0] not in record.getMessage() and mask_pans(PANS[0]) in record.getMessage()


def test_filter_is_idempotent() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "card %s", (PANS[0],), None)
    f = PanMaskingFilter()
    f.filter(record)
    once = record.getMessage()
    f.filter(record)
    assert record.getMessage() == once


# ---- metrics ---------------------------------------------------------------------------------


class CacheCounts:
    """What the exporter reads off a Keyring: two integer attributes."""

    def __init__(self) -> None:
        self.cache_hits = 0
        self.cache_misses = 0


def at(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def scrape(port: int) -> tuple[str, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:  # noqa: S310
        assert response.status == 200
        body = response.read().decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    return body, samples


def test_metrics_exposition_over_http() -> None:
    metrics = Metrics()
    keyring = CacheCounts()
    metrics.observe_keyring(keyring)
    metrics.observe_call("Tokenize", "OK", 0.0007)
    metrics.observe_call("Tokenize", "OK", 0.2)
    metrics.observe_call("Detokenize", "RESOURCE_EXHAUSTED", 0.001)
    metrics.observe_detokenized(SETTLEMENT, 3)
    metrics.observe_detokenized(SETTLEMENT, 0)
    metrics.observe_quota_refusal(SETTLEMENT, "Detokenize")
    metrics.observe_audit_record("SUCCESS")
    keyring.cache_hits, keyring.cache_misses = 7, 2

    server, port = start_metrics_server(metrics)
    try:
        assert port > 0
        body, s = scrape(port)
        assert s["vaultline_grpc_calls_total", at(method="Tokenize", code="OK")] == 2
        assert (
            s["vaultline_grpc_calls_total", at(method="Detokenize", code="RESOURCE_EXHAUSTED")] == 1
        )
        assert s["vaultline_grpc_call_seconds_bucket", at(method="Tokenize", le="0.001")] == 1
        assert s["vaultline_grpc_call_seconds_bucket", at(method="Tokenize", le="5.0")] == 2
        assert s["vaultline_grpc_call_seconds_count", at(method="Tokenize")] == 2
        assert s["vaultline_detokenized_tokens_total", at(identity=SETTLEMENT)] == 3
        assert (
            s["vaultline_quota_refusals_total", at(identity=SETTLEMENT, method="Detokenize")] == 1
        )
        assert s["vaultline_audit_records_total", at(outcome="SUCCESS")] == 1
        assert s["vaultline_dek_cache_total", at(result="hit")] == 7
        assert s["vaultline_dek_cache_total", at(result="miss")] == 2
        assert "process_cpu_seconds_total" in body or sys.platform != "linux"

        keyring.cache_hits = 8  # read at scrape time
        _, s = scrape(port)
        assert s["vaultline_dek_cache_total", at(result="hit")] == 8
    finally:
        stop_metrics_server(server)
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_commit_delay_choice_and_decisions_are_exported() -> None:
    metrics = Metrics(process_metrics=False)
    reg = metrics.registry

    def decisions(choice: str) -> float | None:
        return reg.get_sample_value("vaultline_commit_delay_decisions_total", {"choice": choice})

    assert reg.get_sample_value("vaultline_commit_delay_seconds") is None  # none observed
    delay = CommitDelay(0.004, probe=0.25, hold=2.0)
    metrics.observe_commit_delay(delay)
    assert reg.get_sample_value("vaultline_commit_delay_seconds") == 0.002  # the middle
    assert decisions("longer") == 0

    # A service that completes 5 calls per 2 ms chunk without a wait, 6 at 2 ms, 4 at 4 ms,
    # for 6.2 s: one probe keeps 2 ms against 4 ms, the next (after 2 s) against none.
    now = 100.0
    while now < 106.2:
        delay.after_chunk({0.0: 5, 0.002: 6, 0.004: 4}[delay.wait], now)
        now += 0.002
    assert reg.get_sample_value("vaultline_commit_delay_seconds") == 0.002
    assert (decisions("longer"), decisions("shorter"), decisions("kept")) == (0, 0, 2)
    gain = reg.get_sample_value("vaultline_commit_delay_last_gain_ratio")
    assert gain == pytest.approx(5 / 6 - 1, abs=0.02)


def test_metrics_instances_do_not_share_a_registry() -> None:
    first, second = Metrics(process_metrics=False), Metrics(process_metrics=False)
    first.observe_call("Tokenize", "OK", 0.01)
    labels = {"method": "Tokenize", "code": "OK"}
    assert second.registry.get_sample_value("vaultline_grpc_calls_total", labels) is None
    # Without a keyring the DEK cache family is exposed empty rather than as zeros.
    assert first.registry.get_sample_value("vaultline_dek_cache_total", {"result": "hit"}) is None


@pytest.mark.parametrize(
    "value",
    [
        PANS[0],
        "spiffe://vaultline/4111 1111 1111 1111",
        "5555-5555-5555-4444",
        "4000123412341235",  # a numeric token: 16 digits failing Luhn
        "123456789012",
        "tok_AAAAAAAAAAAAAAAAAAAAAA",
        "TOK_x",
    ],
)
def test_label_guard_refuses_pans_and_tokens(value: str) -> None:
    assert _safe_label(value) == REDACTED_LABEL


@pytest.mark.parametrize("value", [SETTLEMENT, "Tokenize", "Detokenize", "OK", "12345678901"])
def test_label_guard_keeps_ordinary_values(value: str) -> None:
    assert _safe_label(value) == value


def test_unsafe_labels_never_reach_the_exposition() -> None:
    metrics = Metrics(process_metrics=False)
    metrics.observe_detokenized(f"spiffe://vaultline/{PANS[0]}", 1)
    metrics.observe_quota_refusal("tok_AAAAAAAAAAAAAAAAAAAAAA", PANS[1])
    metrics.observe_call(PANS[2], "OK", 0.01)
    metrics.observe_detokenized(None, 1)

    body = generate_latest(metrics.registry).decode()
    assert not any(pan in body for pan in PANS) and "tok_" not in body
    assert f'identity="{REDACTED_LABEL}"' in body and 'identity="anonymous"' in body
