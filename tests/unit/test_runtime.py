"""The process runtime settings: the collector thresholds the tokenizer and `settle run` use."""

from __future__ import annotations

import gc

from vaultline.runtime import GC_THRESHOLDS, tune_gc


def test_tune_gc_raises_the_young_threshold_and_keeps_collection_on() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0]
        assert gc.isenabled()
        # Cyclic garbage is still reclaimed: a forced pass finds an unreachable cycle.
        class Node:
            ref: object = None

        a, b = Node(), Node()
        a.ref, b.ref = b, a
        del a, b
        assert gc.collect() >= 2
    finally:
        gc.set_threshold(*before)

