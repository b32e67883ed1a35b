"""The broker contract on the in-process memory broker."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import pytest

from eventrelay.brokers.memory import MemoryBroker
from tests.brokers.contract import LEASES, OUTAGES, PROCESSES, SERVER, BrokerContract, MakeBroker

IN_PROCESS = "in-process: nothing is shared between instances, and nothing outlives its process"


class TestMemoryBroker(BrokerContract):
    cannot: ClassVar[Mapping[str, str]] = {
        SERVER: "in-process: there is no server, and its URL has no password",
        OUTAGES: "in-process: there is no server to lose",
        LEASES: IN_PROCESS,
        PROCESSES: IN_PROCESS,
    }

    @pytest.fixture
    def make_broker(self) -> MakeBroker:
        def make(options: str = "", *, port: int | None = None) -> MemoryBroker:
            return MemoryBroker()

        return make
