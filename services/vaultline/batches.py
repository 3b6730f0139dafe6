"""Settlement batch rows: the checks every row passes, and the digest an approver names.

Pure. Shared by the capture-file parser (`settlement.batch`, in the `settle` client) and the
tokenizer's SettlementService (`dual_control`), so a row the client accepts is a row the
server accepts, and the digest the approver computes from the file is the one the server
computes from the stored rows (and PostgreSQL from the table, `settlement_rows_sha256`).

Problems are fixed phrases: they never echo a value (a PAN pasted in the token column must
not reach a terminal or a log).
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

from .card import has_digit_run
from .tokens import TokenError, parse_token

__all__ = [
    "BATCH_ID",
    "ISO_4217",
    "MAX_AMOUNT",
    "RowsDigest",
    "amount_problem",
    "approval_message",
    "auth_code_problem",
    "currency_problem",
    "reference_problem",
    "token_problem",
]

MAX_AMOUNT: Final = 10**15 - 1  # 15 digits: fits the processor file's fixed amount field
BATCH_ID: Final = re.compile(r"sb_[0-9a-f]{10}\Z")
_REFERENCE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}\Z")
_AUTH_CODE: Final = re.compile(r"[A-Za-z0-9]{1,12}\Z")

# Active ISO 4217 alphabetic codes (funds and precious-metal codes excluded).
ISO_4217: Final = frozenset("""
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP
BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP
GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR
KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK
MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR
SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS
UAH UGX USD UYU UZS VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
""".split())


def reference_problem(reference: str) -> str | None:
    if not _REFERENCE.match(reference) or has_digit_run(reference):
        return "must be 1-64 of A-Z a-z 0-9 . _ : / - and not a card number"
    return None


def token_problem(token: str) -> tuple[str, str | None]:
    """(the canonical token, None) or ("", the problem)."""
    try:
        return parse_token(token)[0], None
    except TokenError:
        return "", "not a vaultline token (" + TokenError.description + ")"


def amount_problem(amount_minor: int) -> str | None:
    if amount_minor < 1:
        return "must be a positive integer (minor units)"
    if amount_minor > MAX_AMOUNT:
        return f"must be at most {MAX_AMOUNT}"
    return None


def currency_problem(currency: str) -> str | None:
    return None if currency in ISO_4217 else "not an ISO 4217 code (upper case, e.g. EUR)"


def auth_code_problem(auth_code: str) -> str | None:
    return None if not auth_code or _AUTH_CODE.match(auth_code) else (
        "must be 1-12 letters or digits")


class RowsDigest:
    """SHA-256 over the rows in line order, each `reference TAB token TAB amount_minor TAB
    currency TAB auth_code LF` (UTF-8). None of the fields can hold a tab or a newline."""

    __slots__ = ("_sha",)

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def update(self, reference: str, token: str, amount_minor: int, currency: str,
               auth_code: str) -> None:
        self._sha.update(f"{reference}\t{token}\t{amount_minor}\t{currency}\t{auth_code}\n"
                         .encode())

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def approval_message(batch_id: str, tenant: str, created_by: str, approved_by: str,
                     rows_sha256: str, row_count: int) -> bytes:
    """What the tokenizer signs when a batch is approved, and checks before revealing any of
    its rows: a database role can write an approval row, never this signature."""
    return (f"vaultline-settlement-approval:v1:{batch_id}:{tenant}:{created_by}:{approved_by}:"
            f"{rows_sha256}:{row_count}").encode()
