"""Flow YAML loading and validation: every shipped flow loads; every problem names file+field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from vaultline.card import CardBrand
from vaultline.ivr.flows import FlowError, load_flow, load_flows, parse_flow

FLOWS = Path(__file__).resolve().parents[2] / "ivr_flows"


def minimal(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "pay",
        "tenant": "default",
        "steps": [{"step": "card_number"}, {"step": "expiry"}],
        "on_success": {"say": "Thanks", "then": "hangup"},
        "on_failure": {"say": "Sorry", "then": "redirect", "url": "/voice/queue/support"},
    }
    doc.update(over)
    return doc


def problems(doc: Any) -> list[str]:
    with pytest.raises(FlowError) as info:
        parse_flow(doc, "f.yaml")
    return info.value.problems


def test_shipped_flows_load() -> None:
    flows = load_flows(FLOWS)
    assert set(flows) >= {"card_capture", "agent_handoff"}
    cc = flows["card_capture"]
    assert [s.kind for s in cc.steps] == ["card_number", "expiry", "security_code",
                                          "confirmation"]
    assert cc.on_failure.action == "redirect" and cc.on_failure.url == "/voice/queue/support"
    assert CardBrand.MAESTRO not in cc.accepted_brands
    ah = flows["agent_handoff"]
    assert ah.on_success.action == ah.on_failure.action == "conference"
    assert ah.steps[3].kind == "postal_code" and ah.steps[3].min_length == 5


def test_minimal_flow_gets_defaults() -> None:
    flow = parse_flow(minimal(), "f.yaml")
    card = flow.steps[0]
    assert card.timeout == 5 and card.finish_on_key == "#" and card.max_attempts == 3
    assert set(card.reprompts) == {"invalid-card-number", "invalid-card-type", "input-timeout"}
    assert flow.accepted_brands == frozenset(CardBrand)
    assert flow.last_sensitive_index == 1


def test_prompt_mapping_with_voice_and_language() -> None:
    flow = parse_flow(minimal(voice={"voice": "alice", "language": "en-GB"}, steps=[
        {"step": "card_number", "prompt": {"text": "Card?", "voice": "Polly.Amy"}},
        {"step": "expiry", "prompt": "Expiry?"},
    ]), "f.yaml")
    assert flow.steps[0].prompt.voice == "Polly.Amy"
    assert flow.steps[0].prompt.language == "en-GB"
    assert flow.steps[1].prompt.voice == "alice"


@pytest.mark.parametrize("doc, expected", [
    ([1, 2], "f.yaml: (document): must be a mapping"),
    (minimal(name="Bad Name"), "f.yaml: name: must be 1-63"),
    (minimal(tenant=""), "f.yaml: tenant: must be 1-63"),
    (minimal(token_format="fpe"), "f.yaml: token_format: must be one of"),
    (minimal(accepted_brands=["VISA", "AMAZON"]), "f.yaml: accepted_brands[1]: unknown brand"),
    (minimal(accepted_brands=[]), "f.yaml: accepted_brands: must be a non-empty list"),
    (minimal(colour="blue"), "f.yaml: colour: unknown field"),
    (minimal(steps=[]), "f.yaml: steps: must be a non-empty list"),
    (minimal(steps=[{"step": "card_number"}]), "f.yaml: steps: a 'expiry' step is required"),
    (minimal(steps=[{"step": "pin"}, {"step": "expiry"}]), "f.yaml: steps[0].step: must be one"),
    (minimal(steps=[{"step": "expiry"}, {"step": "card_number"}]),
     "f.yaml: steps[1].step: must come before 'expiry'"),
    (minimal(steps=[{"step": "card_number"}, {"step": "card_number"}, {"step": "expiry"}]),
     "f.yaml: steps[1].step: 'card_number' appears twice"),
    (minimal(steps=[{"step": "card_number", "timeout": 0}, {"step": "expiry"}]),
     "f.yaml: steps[0].timeout: must be an integer 1-60"),
    (minimal(steps=[{"step": "card_number", "timeout": "5"}, {"step": "expiry"}]),
     "f.yaml: steps[0].timeout: must be an integer 1-60"),
    (minimal(steps=[{"step": "card_number", "max_attempts": 9}, {"step": "expiry"}]),
     "f.yaml: steps[0].max_attempts: must be an integer 1-5"),
    (minimal(steps=[{"step": "card_number", "finish_on_key": "*"}, {"step": "expiry"}]),
     "f.yaml: steps[0].finish_on_key: must be '#'"),
    (minimal(steps=[{"step": "card_number", "reprompts": {"invalid-date": "x"}},
                    {"step": "expiry"}]),
     "f.yaml: steps[0].reprompts.invalid-date: not an error of this step"),
    (minimal(steps=[{"step": "card_number", "prompt": ""}, {"step": "expiry"}]),
     "f.yaml: steps[0].prompt: must be a non-empty string"),
    (minimal(steps=[{"step": "card_number", "prompt": "Card {pan}"}, {"step": "expiry"}]),
     "f.yaml: steps[0].prompt: only the confirmation may use placeholders"),
    (minimal(steps=[{"step": "card_number"}, {"step": "expiry"},
                    {"step": "confirmation", "prompt": "Card {brand}, press 1"}]),
     "f.yaml: steps[2].prompt: must read back '{last4}'"),
    (minimal(steps=[{"step": "card_number"}, {"step": "expiry"},
                    {"step": "postal_code", "min_length": 8, "max_length": 5}]),
     "f.yaml: steps[2].max_length: must be at least min_length"),
    (minimal(steps=[{"step": "card_number", "min_length": 3}, {"step": "expiry"}]),
     "f.yaml: steps[0].min_length: unknown field"),
    (minimal(on_success={"then": "transfer"}), "f.yaml: on_success.then: must be one of"),
    (minimal(on_failure={"then": "redirect"}),
     "f.yaml: on_failure.url: must be a non-empty string"),
    (minimal(on_failure={"then": "redirect", "url": "ftp://x"}),
     "f.yaml: on_failure.url: must be an http(s):// URL or a path"),
    (minimal(on_failure={"then": "hangup", "url": "/x"}),
     "f.yaml: on_failure.url: only used with 'then: redirect'"),
    (minimal(on_failure={"then": "enqueue", "queue": "no spaces"}),
     "f.yaml: on_failure.queue: must be 1-64"),
    (minimal(on_success=None), "f.yaml: on_success: must be a mapping"),
    (minimal(crm={"callback_url": "crm.example"}), "f.yaml: crm.callback_url: must be an http"),
])
def test_each_problem_names_file_and_field(doc: Any, expected: str) -> None:
    found = problems(doc)
    assert any(p.startswith(expected) for p in found), found


def test_all_problems_reported_together() -> None:
    found = problems(minimal(name="X", tenant="", steps=[{"step": "card_number", "timeout": 99}]))
    fields = {p.split(": ")[1] for p in found}
    assert {"name", "tenant", "steps[0].timeout", "steps"} <= fields


def test_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "pay.yaml"
    bad.write_text("name: pay\n  bad: [indent\n")
    with pytest.raises(FlowError, match=r"pay.yaml: line \d+: not valid YAML"):
        load_flow(bad)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(minimal()))
    with pytest.raises(FlowError, match="other.yaml: name: must equal the file name 'other'"):
        load_flow(other)
    with pytest.raises(FlowError, match="cannot be read"):
        load_flow(tmp_path / "missing.yaml")
    with pytest.raises(FlowError, match="no \\*.yaml flows"):
        load_flows(tmp_path / "empty")


def test_load_flows_reports_every_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(minimal(name="a", tenant="")))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(minimal(name="b", steps=[])))
    with pytest.raises(FlowError) as info:
        load_flows(tmp_path)
    text = str(info.value)
    assert "a.yaml: tenant:" in text and "b.yaml: steps:" in text


# ---- mode: pay -----------------------------------------------------------------------------


def test_the_shipped_pay_flow_loads() -> None:
    flow = load_flows(FLOWS)["card_capture_pay"]
    assert flow.mode == "pay"
    assert [s.kind for s in flow.steps] == ["card_number", "expiry", "security_code"]
    assert CardBrand.UNIONPAY not in flow.accepted_brands


def test_gather_is_the_default_mode() -> None:
    assert parse_flow(minimal()).mode == "gather"


@pytest.mark.parametrize(("over", "expected"), [
    ({"mode": "push"}, "f.yaml: mode: must be one of gather, pay"),
    ({"mode": "pay", "steps": [{"step": "card_number"}, {"step": "expiry"},
                               {"step": "confirmation", "prompt": "ending {last4}"}]},
     "f.yaml: steps[2].step: 'confirmation' is not used with mode: pay"),
    ({"mode": "pay", "steps": [{"step": "card_number", "max_attempts": 4}, {"step": "expiry"}]},
     "f.yaml: steps[0].max_attempts: must be at most 3 with mode: pay"),
    ({"mode": "pay", "steps": [{"step": "card_number", "finish_on_key": "#"},
                               {"step": "expiry"}]},
     "f.yaml: steps[0].finish_on_key: not used with mode: pay"),
    ({"mode": "pay", "accepted_brands": ["VISA", "UNIONPAY"]},
     "f.yaml: accepted_brands: UNIONPAY cannot be taken with mode: pay"),
    ({"mode": "pay", "token_format": "opaque"},
     "f.yaml: token_format: not used with mode: pay"),
])
def test_what_pay_mode_cannot_do_is_refused(over: dict[str, Any], expected: str) -> None:
    found = problems(minimal(**over))
    assert any(p.startswith(expected) for p in found), found
