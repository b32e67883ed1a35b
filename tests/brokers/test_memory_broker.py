"""The broker contract on the in-process memory broker."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import pytest

from eventrelay.brokers.base import Broker
from eventrelay.brokers.memory import MemoryBroker
from tests.brokers.contract import LEASES, OUTAGES, PROCESSES, SERVER, BrokerContract, MakeBroker
from tests.brokers.contract_replies import ReplyContract

IN_PROCESS = "in-process: nothing is shared between instances, and nothing outlives its process"


class TestMemoryBroker(BrokerContract, ReplyContract):
    cannot: ClassVar[Mapping[str, str]] = {
        SERVER: "in-process: there is no server, and its URL has no password",
        OUTAGES: "in-process: there is no server to lose",
        LEASES: IN_PROCESS,
        PROCESSES: IN_PROCESS,
    }

    @pytest.fixture
    def make_broker(self) -> MakeBroker:
        shared = MemoryBroker()  # what buses share in one process

        def make(options: str = "", *, port: int | None = None) -> MemoryBroker:
            return shared

        return make

    async def reply_channel_exists(self, broker: Broker, address: str) -> bool:
        assert isinstance(broker, MemoryBroker)
        return bool(broker._bindings.get(address))  # the generic channel's binding
