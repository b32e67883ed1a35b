"""The package's shape (issue 18): imports run one way, from the face down to the ports, and no module grows
past what a reader takes in. `python -m tests.import_graph` prints the graph these read."""

from __future__ import annotations

from tests.import_graph import LINE_LIMIT, cycles, graph, long_modules


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert cycles(graph()) == []


def test_the_core_never_reaches_back_up_to_the_bus_or_the_service() -> None:
    arrows = graph()
    face = {"eventrelay", "eventrelay.bus", "eventrelay.service", "eventrelay.cli", "eventrelay.testing"}
    core = [
        "eventrelay.consumer",
        "eventrelay.dispatch",
        "eventrelay.inbox",
        "eventrelay.outbox",
        "eventrelay.uow",
        "eventrelay.handlers",
        "eventrelay.metrics",
        "eventrelay.local",
        "eventrelay.requests",
        "eventrelay.saga",
    ]
    assert {module: sorted(arrows[module] & face) for module in core} == {module: [] for module in core}


def test_the_adapters_import_only_the_ports_and_their_own_plumbing() -> None:
    arrows = graph()
    adapters = [m for m in arrows if m.startswith(("eventrelay.brokers.", "eventrelay.stores."))]
    allowed: tuple[str, ...] = ("eventrelay.brokers", "eventrelay.stores", "eventrelay.sql")
    allowed += ("eventrelay.envelope", "eventrelay.errors", "eventrelay.config", "eventrelay.codec")
    reaching = {m: sorted(t for t in arrows[m] if not t.startswith(allowed)) for m in adapters}
    assert {m: t for m, t in reaching.items() if t} == {}


def test_no_module_is_over_the_line_limit() -> None:
    assert long_modules() == {}, f"split these along a real seam (at most {LINE_LIMIT} lines)"
