"""The package's imports run one way: entry points on top, pure cores at the bottom.

Read from the source with `ast` (every import counts: module level, inside functions, and
under TYPE_CHECKING), so a new upward import or circle fails here before a reviewer has to
spot it. A new top-level module must be given its layer below.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "services" / "vaultline"

# Each top-level module or package of `vaultline`, by layer; a module may import from its own
# layer (without a circle) and the layers below, never from above.
LAYERS: dict[str, int] = {
    # pure cores: no I/O
    "card": 1, "tokens": 1, "crypto": 1, "errors": 1, "commit_delay": 1, "group_commit": 1,
    "batches": 1,
    "runtime": 1, "resources": 1, "gen": 1,
    # adapters: one module per external system
    "store": 2, "ivr_store": 2, "vault": 2, "httpserve": 2, "rpc_reasons": 2,
    # the domain: operations, keys, access, audit
    "service": 3, "keyring": 3, "security": 3, "retention": 3, "dual_control": 3,
    "captures": 3, "security_codes": 3,
    # the products and the gRPC edge
    "api": 4, "ivr": 4, "panel": 4, "recordings": 4, "descope": 4, "settlement": 4,
    "observability": 4, "twilio_sim": 4,
    # configuration (the environment and stack.json) and the worker supervisor, for entry
    # points only
    "config": 5, "workers": 5,
    # entry points
    "cli": 6, "server": 6, "devstack": 6,
}

# Pure cores talk to no network, database or process.
IO_LIBRARIES = {"asyncpg", "hvac", "grpc", "aiohttp", "requests", "socket", "subprocess",
                "urllib", "twilio", "prometheus_client"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] in ("gen", "_data"):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(("vaultline", *parts))] = path
    return found


def _imports(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in the file, resolved to absolute names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module, node.lineno
            for alias in node.names:  # `from . import x` imports the module x
                yield f"{module}.{alias.name}", node.lineno


def _graph() -> dict[str, set[tuple[str, int]]]:
    modules = _modules()
    graph: dict[str, set[tuple[str, int]]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, line in _imports(name, path):
            if target in modules and target != name and not name.startswith(target + "."):
                graph[name].add((target, line))
    return graph


def _unit(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_module_has_a_layer() -> None:
    units = {_unit(m) for m in _modules()} - {""}
    assert units - LAYERS.keys() == set(), "give the new module its layer in LAYERS"


def test_no_module_imports_from_a_layer_above_it() -> None:
    upward = [
        f"{source}:{line} imports {target} (layer {LAYERS[_unit(target)]} > "
        f"{LAYERS[_unit(source)]})"
        for source, targets in _graph().items() if _unit(source)
        for target, line in targets
        if LAYERS[_unit(target)] > LAYERS[_unit(source)]
    ]
    assert upward == []


def test_the_imports_have_no_circle() -> None:
    graph = {m: {t for t, _ in targets} for m, targets in _graph().items()}
    done: set[str] = set()
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circles.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert circles == []


def test_pure_cores_do_no_io() -> None:
    pure = [m for m in _modules() if LAYERS.get(_unit(m)) == 1]
    offending = [
        f"{module}:{line} imports {target}"
        for module in pure
        for target, line in _imports(module, _modules()[module])
        if target.split(".")[0] in IO_LIBRARIES
    ]
    assert offending == []


def test_the_agent_panel_reaches_nothing_inside_the_card_data_zone() -> None:
    """The panel runs outside the zone with the crm identity only: no database, no OpenBao,
    no keys, no card-data code — transitively, whatever it imports."""
    graph = {m: {t for t, _ in targets} for m, targets in _graph().items()}
    reached: set[str] = set()
    todo = [m for m in graph if m.startswith("vaultline.panel")]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += graph[module]
    allowed = ("vaultline.panel", "vaultline.gen", "vaultline.httpserve")
    assert sorted(m for m in reached if not m.startswith(allowed)) == []
    third_party = {t.split(".")[0] for m in reached if m in _modules()
                   for t, _ in _imports(m, _modules()[m])}
    assert not third_party & {"asyncpg", "hvac"}
