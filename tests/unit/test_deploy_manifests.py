"""The production layout (infra/deploy, issue 19): the flows its NetworkPolicies allow are
exactly the ones README.md draws, so a drifting policy fails CI; and every workload runs
non-root, read-only, with resource requests and a disruption budget."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "infra" / "deploy"
OURS = {"vaultline-cde", "vaultline-crm"}
WORKLOADS = {"Deployment", "StatefulSet", "CronJob"}
FLOW = re.compile(r"^- `(?P<src>[\w./*-]+) → (?P<dst>[\w./*-]+):(?P<port>\d+)(?:/(?P<proto>UDP))?`",
                  re.MULTILINE)

Edge = tuple[str, str, int, str]


def manifests() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / resource).read_text()) if d]
    return docs


def _node(namespace: str, selector: dict[str, Any] | None) -> str:
    labels = (selector or {}).get("matchLabels") or {}
    assert len(labels) <= 1, f"one label per selector keeps the drawing readable: {labels}"
    return f"{namespace}/{next(iter(labels.values()))}" if labels else f"{namespace}/*"


def _peer(policy: dict[str, Any], peer: dict[str, Any]) -> str:
    namespace = policy["metadata"]["namespace"]
    if "ipBlock" in peer:
        names = dict(item.split("=") for item in policy["metadata"].get(
            "annotations", {}).get("vaultline.io/external-peers", "").split(",") if item)
        cidr = peer["ipBlock"]["cidr"]
        assert cidr in names, f"{policy['metadata']['name']}: name the ipBlock {cidr}"
        return f"external/{names[cidr]}"
    if "namespaceSelector" in peer:
        labels = peer["namespaceSelector"].get("matchLabels") or {}
        namespace = labels["kubernetes.io/metadata.name"]  # never "any namespace"
    return _node(namespace, peer.get("podSelector"))


def _edges(policy: dict[str, Any], direction: str) -> set[Edge]:
    spec = policy["spec"]
    pods = _node(policy["metadata"]["namespace"], spec["podSelector"])
    edges: set[Edge] = set()
    for rule in spec.get(direction, []):
        peers = rule.get("from" if direction == "ingress" else "to")
        assert peers, f"{policy['metadata']['name']}: a rule without peers allows everyone"
        assert rule.get("ports"), f"{policy['metadata']['name']}: a rule without ports"
        for peer in peers:
            other = _peer(policy, peer)
            for port in rule["ports"]:
                proto = port.get("protocol", "TCP")
                edge = (other, pods, port["port"], proto) if direction == "ingress" else (
                    pods, other, port["port"], proto)
                edges.add(edge)
    return edges


def policy_graph() -> set[Edge]:
    policies = [d for d in manifests() if d["kind"] == "NetworkPolicy"]
    ingress = set().union(*(_edges(p, "ingress") for p in policies))
    egress = set().union(*(_edges(p, "egress") for p in policies))

    def internal(node: str) -> bool:
        return node.split("/")[0] in OURS

    one_sided = {e for e in ingress ^ egress if internal(e[0]) and internal(e[1])}
    assert not one_sided, f"flows allowed at one end only (dead rules or drift): {one_sided}"
    return ingress | egress


def drawn_graph() -> set[Edge]:
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- flows:begin -->", 1)[1].split("<!-- flows:end -->", 1)[0]
    return {(m["src"], m["dst"], int(m["port"]), m["proto"] or "TCP")
            for m in FLOW.finditer(section)}


def test_the_network_policies_allow_exactly_the_drawn_flows() -> None:
    drawn = drawn_graph()
    assert len(drawn) > 10
    allowed = policy_graph()
    assert allowed - drawn == set(), "allowed by the policies but not in the drawing"
    assert drawn - allowed == set(), "in the drawing but not allowed by the policies"
    # The zone's boundary: only the tokenizer's gRPC port is reachable from outside the zone.
    crossing = {(s, d, p) for s, d, p, _ in allowed
                if s.startswith("vaultline-crm/") and d.startswith("vaultline-cde/")}
    assert crossing == {("vaultline-crm/crm-integration", "vaultline-cde/tokenizer", 50051),
                        ("vaultline-crm/panel", "vaultline-cde/tokenizer", 50051)}


def test_every_namespace_denies_by_default() -> None:
    policies = [d for d in manifests() if d["kind"] == "NetworkPolicy"]
    for namespace in OURS:
        deny = [p for p in policies if p["metadata"]["namespace"] == namespace
                and p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
                and not p["spec"].get("egress")]
        assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}, namespace


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def test_every_workload_is_non_root_read_only_and_sized() -> None:
    workloads = [d for d in manifests() if d["kind"] in WORKLOADS]
    assert {w["metadata"]["name"] for w in workloads} == {
        "tokenizer", "ivr", "settlement", "openbao", "panel"}
    for workload in workloads:
        pod = _pod_spec(workload)
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert "ALL" in security["capabilities"]["drop"], name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert "memory" in container["resources"]["limits"], name


def test_every_long_running_workload_has_a_disruption_budget() -> None:
    docs = manifests()
    budgets = {(d["metadata"]["namespace"], tuple(sorted(
        d["spec"]["selector"]["matchLabels"].items()))) for d in docs
        if d["kind"] == "PodDisruptionBudget"}
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        key = (workload["metadata"]["namespace"], tuple(sorted(
            workload["spec"]["selector"]["matchLabels"].items())))
        assert key in budgets, workload["metadata"]["name"]
    (database,) = [d for d in docs if d["kind"] == "Cluster"]
    assert database["spec"]["enablePDB"] is True and database["spec"]["instances"] >= 3
    assert database["spec"]["postgresql"]["synchronous"]["dataDurability"] == "required"


def test_the_card_data_zone_holds_every_card_handling_workload() -> None:
    for doc in manifests():
        if doc["kind"] in WORKLOADS | {"Cluster"}:
            zone = "vaultline-crm" if doc["metadata"]["name"] == "panel" else "vaultline-cde"
            assert doc["metadata"]["namespace"] == zone, doc["metadata"]["name"]


def test_the_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"])
    present = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*.yaml")
               if p.name != "kustomization.yaml"}
    assert listed == present
