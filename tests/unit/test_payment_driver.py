"""The Payment driver (pure): an agent-assisted capture as transitions over StatusCallbacks
and agent commands."""

from __future__ import annotations

from vaultline.ivr import payment as p


def callback(field: str, **params: str) -> dict[str, str]:
    return {"Capture": p.TWILIO_FIELD[field], **params}


def test_start_pauses_the_recording_before_anything_else() -> None:
    step = p.start(security_code=True, postal_code=False)
    assert step.commands == (p.PauseRecording(), p.CreatePayment(True, False),
                             p.CapturePaymentField("card-number"))
    assert step.state.fields == ("card-number", "expiration-date", "security-code")
    assert step.events == (p.EventSpec("capturing", "card-number", 0, "", 1),)


def test_digits_are_counted_from_the_masked_value_never_kept() -> None:
    state = p.start(False, False).state
    step = p.on_callback(state, callback("card-number", PartialResult="true",
                                         PaymentCardNumber="xxxxxx"))
    assert step.state == state and step.commands == ()
    assert step.events == (p.EventSpec("capturing", "card-number", 6, "", 1),)


def test_a_valid_field_moves_to_the_next_and_the_last_completes() -> None:
    state = p.start(False, True).state
    step = p.on_callback(state, callback("card-number", PartialResult="false",
                                         PaymentCardNumber="xxxxxxxxxxxx1111",
                                         Required="expiration-date,postal-code"))
    assert step.events[0] == p.EventSpec("capturing", "card-number", 16, "valid", 1)
    assert step.commands == (p.CapturePaymentField("expiration-date"),)
    # Twilio may say postal-code is no longer required: it is skipped.
    step = p.on_callback(step.state, callback("expiration-date", ExpirationDate="xxxx",
                                              Required=""))
    assert step.commands == (p.CompletePayment(),) and step.state.phase == "completing"
    done = p.on_callback(step.state, {"Result": "success", "PaymentToken": "tok_x"})
    assert done.commands == (p.ResumeRecording(), p.Finish("tok_x")) and done.state.ended
    assert p.on_callback(done.state, callback("card-number", PartialResult="true")).events == ()


def test_an_invalid_field_is_asked_again_then_the_capture_fails() -> None:
    state = p.start(False, False).state
    for attempt in (1, 2):
        step = p.on_callback(state, callback("card-number", ErrorType="invalid-card-number"))
        assert step.events[0] == p.EventSpec("capturing", "card-number", 0,
                                             "invalid-card-number", attempt)
        assert step.commands == (p.CapturePaymentField("card-number"),)
        state = step.state
    step = p.on_callback(state, callback("card-number", ErrorType="invalid-card-number"))
    assert step.state.ended
    assert step.events[-1] == p.EventSpec("failed", failure="too-many-failed-attempts")
    assert step.commands == (p.CancelPayment(), p.ResumeRecording(), p.Finish())


def test_news_of_another_field_changes_nothing() -> None:
    state = p.start(False, False).state
    step = p.on_callback(state, callback("expiration-date", PartialResult="true"))
    assert step == p.Step(state)


def test_the_agent_cancels_or_asks_again() -> None:
    state = p.on_callback(p.start(False, False).state,
                          callback("card-number", PartialResult="false")).state
    again = p.on_command(state, "restart:card-number")
    assert again.commands == (p.CapturePaymentField("card-number"),)
    assert again.events == (p.EventSpec("capturing", "card-number", 0, "", 2),)
    assert "card-number" not in again.state.done
    assert p.on_command(state, "restart:postal-code") == p.Step(state)  # not asked for
    cancelled = p.on_command(state, "cancel")
    assert cancelled.events == (p.EventSpec("cancelled", failure="agent-cancelled"),)
    assert cancelled.commands == (p.CancelPayment(), p.ResumeRecording(), p.Finish())


def test_results_other_than_success_end_it_with_a_reason() -> None:
    state = p.start(False, False).state
    for result, status, reason in [
        ("caller-interrupted-with-star", "cancelled", "caller-pressed-star"),
        ("caller-hung-up", "failed", "caller-hung-up"),
        ("something-new", "failed", "payment-failed"),
    ]:
        step = p.on_callback(state, {"Result": result})
        assert step.events == (p.EventSpec(status, failure=reason),)
        assert step.commands == (p.ResumeRecording(), p.Finish())
    step = p.on_callback(state, {"Result": "payment-connector-error",
                                 "ConnectorError": "invalid-card-number"})
    assert step.events[0].failure == "connector-error:invalid-card-number"


def test_a_failure_cancels_a_payment_in_progress() -> None:
    state = p.start(False, False).state
    step = p.on_failure(state, "twilio-unavailable")
    assert step.events == (p.EventSpec("failed", failure="twilio-unavailable"),)
    assert step.commands[0] == p.CancelPayment()
    assert p.on_failure(step.state, "again") == p.Step(step.state)


def test_the_state_survives_a_json_round_trip() -> None:
    state = p.on_callback(p.start(True, True).state,
                          callback("card-number", ErrorType="invalid-card-number")).state
    assert p.DriverState.from_json(state.to_json()) == state
