"""Process-wide runtime settings for the long-running, allocation-heavy processes.

The tokenizer and `settle run` allocate tens of thousands of short-lived objects per chunk
(rows, records, messages), almost all freed by reference counting. With CPython's default
collector thresholds (700, 10, 10) the cyclic collector still ran ~1,100 times a second during a
BatchDetokenize stream, and every few seconds a full collection walked the whole heap (~36 ms
each): 13% of the tokenizer's CPU time, for garbage that reference counting had already freed.
Raising the first threshold lets the collector run only when container objects really pile up;
cyclic garbage is still collected, just in larger, rarer passes (see load/README.md).
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["GC_THRESHOLDS", "tune_gc"]

# Collect the youngest generation after 50,000 net new container objects (default 700); the
# older generations keep their default ratios, so a full collection still happens regularly.
GC_THRESHOLDS: Final = (50_000, 10, 10)


def tune_gc() -> None:
    """Apply GC_THRESHOLDS to this process; call once at start-up of a server or bulk job."""
    gc.set_threshold(*GC_THRESHOLDS)
