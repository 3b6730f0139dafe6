"""Logs and metrics: JSON log lines carrying the call's request id, PAN masking on every log
record, and the Prometheus metrics of the tokenizer with their `/metrics` endpoint.

The masking filter is the second line of defence: card numbers must never be logged at all
(`Pan` prints masked), but whatever slips through is masked before any handler of ours writes
it. Metric label values pass `_safe_label`, which refuses anything shaped like a PAN or a token.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
import traceback
from collections.abc import Iterable
from typing import IO, Any, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .api.context import current_call
from .card import PAN_MIN_DIGITS, mask_pans

__all__ = [
    "JsonFormatter",
    "Metrics",
    "PanMaskingFilter",
    "setup_logging",
    "start_metrics_server",
    "stop_metrics_server",
]

# ---- masking ---------------------------------------------------------------------------------

_DIGITS = b"0123456789"


def _mask(text: str) -> str:
    """`mask_pans`, behind a fast path for text with fewer than 12 digits in all.

    Counting digits with `bytes.translate` costs about a fifth of the regex scan. UTF-8 never
    puts an ASCII digit byte inside a multibyte character, so the count is exact.
    """
    if len(text) < PAN_MIN_DIGITS:
        return text
    try:
        raw = text.encode()
    except UnicodeEncodeError:  # lone surrogates: let the regex decide
        return mask_pans(text)
    if len(raw) - len(raw.translate(None, _DIGITS)) < PAN_MIN_DIGITS:
        return text
    return mask_pans(text)


_MAX_DEPTH = 6


def _scrub(value: Any, depth: int = 0) -> Any:
    """`value` with every PAN masked: strings and numbers directly, containers recursively,
    any other object replaced by its masked `str()` (which is what the JSON line shows)."""
    kind = type(value)
    if kind is str:
        return _mask(value)
    if value is None or kind is bool:
        return value
    if kind is int or kind is float:
        text = repr(value)
        masked = _mask(text)
        return value if masked == text else masked
    if depth < _MAX_DEPTH:
        if isinstance(value, dict):
            return {_scrub_key(k): _scrub(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [_scrub(v, depth + 1) for v in value]
    try:
        return _mask(str(value))
    except Exception:  # a broken __str__ must not break the log call
        return "<unprintable>"


def _scrub_key(key: Any) -> Any:
    # Keys stay hashable and JSON-encodable: anything but a scalar becomes its masked str().
    if key is None or type(key) in (str, int, float, bool):
        return _scrub(key)
    return _scrub(key, _MAX_DEPTH)


# Attributes every LogRecord has; anything else on a record came from `extra=`.
# Taken from a live record, so it follows the Python version (3.12 added `taskName`).
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__)
# `message` and `asctime` are set by formatters; they are not the caller's extra fields.
_NOT_EXTRA = _RECORD_ATTRS | {"message", "asctime"}


def _format_exception(exc_info: Any) -> str:
    return "".join(traceback.format_exception(*exc_info)).rstrip("\n")


class PanMaskingFilter(logging.Filter):
    """Masks every Luhn-valid 12-19 digit number in a record, in place; never drops one.

    The message is %-formatted here and `args` cleared, so no handler can format the raw
    arguments again. The traceback is rendered here, masked into `exc_text`, and `exc_info`
    cleared, so no formatter can render the exception's own (unmasked) text.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._mask_record(record)
        except Exception:  # never raise into the caller, never pass on what was not masked
            record.msg, record.args = "log record withheld: PAN masking failed", None
            record.exc_info = record.exc_text = record.stack_info = None
            for key in record.__dict__.keys() - _RECORD_ATTRS:
                del record.__dict__[key]
        return True

    @staticmethod
    def _mask_record(record: logging.LogRecord) -> None:
        msg = record.msg
        if record.args or type(msg) is not str:
            try:
                msg = record.getMessage()
            except Exception:  # a bad format string: keep both parts, masked, for debugging
                try:
                    msg = f"{record.msg!s} args={record.args!r}"
                except Exception:
                    msg = "<unformattable log message>"
            record.args = None
        record.msg = _mask(msg)

        if record.exc_info:
            if not record.exc_text:
                record.exc_text = _format_exception(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = _mask(record.exc_text)
        if record.stack_info:
            record.stack_info = _mask(record.stack_info)

        attrs = record.__dict__
        if len(attrs) > len(_RECORD_ATTRS):  # extra fields (or a formatter's `message`)
            for key in attrs.keys() - _RECORD_ATTRS:
                value = _scrub(attrs.pop(key))
                attrs[_mask(key)] = value


# ---- formatting ------------------------------------------------------------------------------

_CORE_KEYS = ("ts", "level", "logger", "msg", "request_id", "method", "identity", "exc", "stack")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, method, identity, the
    record's extra fields, then exc / stack when present. Core keys win over extra fields."""

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (-1, "")

    def _timestamp(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        cached, prefix = self._second
        if cached != second:  # strftime is the dearest part; one call per second is enough
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, prefix)
        return f"{prefix}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        call = current_call.get()
        line: dict[str, Any] = {
            "ts": self._timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            # request_id is client-supplied: masked like any other free text.
            "request_id": None if call is None else _mask(call.request_id),
            "method": None if call is None else call.method,
            "identity": None if call is None or call.identity is None else _mask(call.identity),
        }
        attrs = record.__dict__
        if len(attrs) > len(_RECORD_ATTRS):
            for key in attrs.keys() - _NOT_EXTRA:
                if key not in _CORE_KEYS:
                    line[key] = attrs[key]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        # ensure_ascii keeps each record on one line and escapes bidi/separator characters.
        return json.dumps(line, default=str)


class _TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal: time level logger [request_id] message."""

    def format(self, record: logging.LogRecord) -> str:
        call = current_call.get()
        rid = "-" if call is None else _mask(call.request_id)
        line = f"{self.formatTime(record)} {record.levelname} {record.name} [{rid}] "
        line += record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + record.stack_info
        return line


_OURS = "_vaultline_handler"


def setup_logging(
    level: str | int = "INFO", *, stream: IO[str] | None = None, json_lines: bool = True
) -> None:
    """Send the root logger's records through the PAN filter to `stream` (stderr by default).

    Idempotent: a repeat call replaces the handler an earlier call installed (so level, stream
    and format follow the last call) and never adds a second one. Handlers installed by others
    are left alone; they do not get the PAN filter.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _OURS, False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    setattr(handler, _OURS, True)
    handler.addFilter(PanMaskingFilter())
    handler.setFormatter(JsonFormatter() if json_lines else _TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


# ---- metrics ---------------------------------------------------------------------------------

REDACTED_LABEL = "redacted"
# A PAN or numeric token (12+ digits, maybe spaced or dashed) or an opaque token.
_UNSAFE_LABEL = re.compile(r"tok_|[0-9](?:[ -]?[0-9]){11}", re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def _safe_label(value: str) -> str:
    """`value`, or `REDACTED_LABEL` if it could hold a PAN or a token.

    Refused outright rather than masked: a masked PAN still leaks BIN and last four and would
    make one series per card.
    """
    return REDACTED_LABEL if _UNSAFE_LABEL.search(value) else value


# From an in-memory hit (~0.5 ms) to a slow batch or a KMS round trip (seconds).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _CacheCounts(Protocol):
    cache_hits: int
    cache_misses: int


class _DekCacheCollector(Collector):
    """Reads the keyring's hit and miss counts at scrape time: no cost on the crypto path."""

    _NAME = "vaultline_dek_cache"
    _DOC = "Data-encryption-key cache lookups, by result."

    def __init__(self) -> None:
        self.keyring: _CacheCounts | None = None

    def describe(self) -> Iterable[CounterMetricFamily]:
        return [CounterMetricFamily(self._NAME, self._DOC, labels=("result",))]

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(self._NAME, self._DOC, labels=("result",))
        keyring = self.keyring
        if keyring is not None:
            family.add_metric(("hit",), keyring.cache_hits)
            family.add_metric(("miss",), keyring.cache_misses)
        return [family]


class _DelayState(Protocol):
    wait: float
    decisions: dict[str, int]
    last_gain: float


class _CommitDelayCollector(Collector):
    """The group commit's adaptive wait (`vaultline.commit_delay`), read at scrape time."""

    def __init__(self) -> None:
        self.delay: _DelayState | None = None

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, CounterMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "vaultline_commit_delay_seconds",
                "How long the unary group commit now waits for company after each chunk."),
            CounterMetricFamily(
                "vaultline_commit_delay_decisions",
                "Probes of the group commit's wait, by what they chose: a longer wait, a"
                " shorter one, or keeping it.",
                labels=("choice",)),
            GaugeMetricFamily(
                "vaultline_commit_delay_last_gain_ratio",
                "Last probe: calls/s completed at the neighbouring wait over the current one,"
                " minus 1."),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        wait, decisions, gain = families = self._families()
        delay = self.delay
        if delay is not None:
            wait.add_metric((), delay.wait)
            for choice, count in delay.decisions.items():
                decisions.add_metric((choice,), count)
            gain.add_metric((), delay.last_gain)
        return families


class Metrics:
    """The tokenizer's metrics, in their own registry (a fresh one per instance by default)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self._call_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._answer_children: dict[tuple[str | None, str], Any] = {}
        reg = self.registry
        self.calls = Counter(
            "vaultline_grpc_calls",
            "gRPC calls finished, by method and status code.",
            ("method", "code"),
            registry=reg,
        )
        self.latency = Histogram(
            "vaultline_grpc_call_seconds",
            "gRPC call duration in seconds, by method.",
            ("method",),
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.detokenized = Counter(
            "vaultline_detokenized_tokens",
            "Tokens detokenized, by caller identity.",
            ("identity",),
            registry=reg,
        )
        self.quota_refusals = Counter(
            "vaultline_quota_refusals",
            "Calls refused by a detokenization quota, by caller identity and method.",
            ("identity", "method"),
            registry=reg,
        )
        self.tokenize_answers = Counter(
            "vaultline_tokenize_answers",
            "Tokenize answers by caller identity and kind: new, returning (the card had a"
            " token) or reused (a request id refused for another card).",
            ("identity", "answer"),
            registry=reg,
        )
        self.tokenize_share_jumps = Counter(
            "vaultline_tokenize_confirming_share_jumps",
            "Windows in which an identity's share of answers confirming a known card jumped.",
            ("identity",),
            registry=reg,
        )
        self.audit_records = Counter(
            "vaultline_audit_records",
            "Audit records written, by outcome.",
            ("outcome",),
            registry=reg,
        )
        self.dek_cache = _DekCacheCollector()
        reg.register(self.dek_cache)
        self.commit_delay = _CommitDelayCollector()
        reg.register(self.commit_delay)
        if process_metrics:
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)

    def observe_call(self, method: str, code_name: str, seconds: float) -> None:
        """One finished call; `code_name` is the grpc.StatusCode name, e.g. 'OK'."""
        # Called on every RPC: the labelled children are looked up once per (method, code).
        children = self._call_children.get((method, code_name))
        if children is None:
            safe = _safe_label(method)
            children = (self.calls.labels(safe, _safe_label(code_name)), self.latency.labels(safe))
            self._call_children[(method, code_name)] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_detokenized(self, identity: str | None, n: int) -> None:
        if n > 0:
            self.detokenized.labels(_identity_label(identity)).inc(n)

    def observe_quota_refusal(self, identity: str | None, method: str) -> None:
        self.quota_refusals.labels(_identity_label(identity), _safe_label(method)).inc()

    def observe_tokenize_answers(self, identity: str | None, answer: str, n: int) -> None:
        if n <= 0:
            return
        # Once per Tokenize call: the labelled child is looked up once per (identity, answer).
        child = self._answer_children.get((identity, answer))
        if child is None:
            child = self.tokenize_answers.labels(_identity_label(identity), answer)
            self._answer_children[(identity, answer)] = child
        child.inc(n)

    def observe_share_jump(self, identity: str | None) -> None:
        self.tokenize_share_jumps.labels(_identity_label(identity)).inc()

    def observe_audit_record(self, outcome: str) -> None:
        self.audit_records.labels(_safe_label(outcome)).inc()

    def observe_keyring(self, keyring: _CacheCounts) -> None:
        """Export `keyring.cache_hits` / `cache_misses` as `vaultline_dek_cache_total`."""
        self.dek_cache.keyring = keyring

    def observe_commit_delay(self, delay: _DelayState) -> None:
        """Export a `CommitDelay`'s current choice, decisions and last measured gain."""
        self.commit_delay.delay = delay


def _identity_label(identity: str | None) -> str:
    return "anonymous" if identity is None else _safe_label(identity)


def start_metrics_server(
    metrics: Metrics, host: str = "127.0.0.1", port: int = 0
) -> tuple[WSGIServer, int]:
    """Serve `metrics` at http://host:port/metrics from a daemon thread; returns the server
    and the bound port (useful with port 0). Stop it with `stop_metrics_server`."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server, server.server_port


def stop_metrics_server(server: WSGIServer) -> None:
    """Stop serving and close the listening socket; returns once the serving thread is done."""
    server.shutdown()
    server.server_close()
