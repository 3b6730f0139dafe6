"""AnswerWatch (pure): an identity's share of Tokenize answers confirming a known card."""

from __future__ import annotations

from vaultline.security.answers import AnswerWatch


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _window(watch: AnswerWatch, clock: Clock, identity: str, answers: int, confirmed: int):  # type: ignore[no-untyped-def]
    """Feed one window's answers, then step past it; the report of the window that closed."""
    report = watch.observe(identity, answers, confirmed)
    clock.now += 61
    return report


def test_a_jump_in_the_confirming_share_is_reported_once_per_window() -> None:
    clock = Clock()
    watch = AnswerWatch(clock=clock)
    reports = [_window(watch, clock, "ivr", 100, 10) for _ in range(4)]  # usually 10%
    assert reports == [None] * 4
    assert _window(watch, clock, "ivr", 100, 70) is None  # the jump is seen at its close...
    jump = watch.observe("ivr", 1, 0)  # ... when the next answer arrives
    assert jump is not None and jump.identity == "ivr" and jump.answers == 100
    assert round(jump.share, 2) == 0.7 and round(jump.usual, 2) == 0.1


def test_small_windows_steady_shares_and_other_identities_raise_nothing() -> None:
    clock = Clock()
    watch = AnswerWatch(clock=clock)
    for _ in range(5):
        assert _window(watch, clock, "crm-like", 10, 10) is None  # under min_answers
        assert _window(watch, clock, "steady", 200, 120) is None  # 60% is its usual
    assert watch.observe("steady", 1, 1) is None
    assert watch.observe("newcomer", 500, 500) is None  # no usual share yet
