"""`descope csv`: a copy of a CSV export with every card number replaced by its token.

The input is read a few thousand rows at a time (memory stays bounded), the cards of each
chunk tokenized in one call, and the copy written to a temporary file beside the output (mode
0600), flushed to disk and renamed into place: the output exists whole or not at all.
"""

from __future__ import annotations

import csv
import os
import secrets
from pathlib import Path
from typing import Final

from .rewrite import cards_in, rewrite_text
from .run import Tokenizer

__all__ = ["descope_csv"]

ROWS_PER_CHUNK: Final = 5000


async def descope_csv(source: Path, target: Path, tokenizer: Tokenizer) -> tuple[int, int]:
    """Rows written and cards replaced."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    rows = cards = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out, source.open(
                "r", encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            writer = csv.writer(out, lineterminator="\n")
            chunk: list[list[str]] = []

            async def flush() -> int:
                pans = {pan for record in chunk for cell in record for pan in cards_in(cell)}
                tokens = await tokenizer.tokenize(pans) if pans else {}
                replaced = 0
                for record in chunk:
                    new = []
                    for cell in record:
                        text, count = rewrite_text(cell, tokens)
                        new.append(text)
                        replaced += count
                    writer.writerow(new)
                chunk.clear()
                return replaced

            for record in reader:
                chunk.append(record)
                rows += 1
                if len(chunk) >= ROWS_PER_CHUNK:
                    cards += await flush()
            cards += await flush()
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return max(rows - 1, 0), cards  # the header is no row
