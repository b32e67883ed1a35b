"""Outbox, inbox and dead-letter stores: in memory, or SQL tables in the service's database."""

from __future__ import annotations

from eventrelay.stores.base import DeadLetter, OutboxRecord, Store, Transaction
from eventrelay.stores.memory import MemoryStore

__all__ = ["DeadLetter", "MemoryStore", "OutboxRecord", "Store", "Transaction"]
