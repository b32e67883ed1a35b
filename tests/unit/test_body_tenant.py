"""The handler's tenant when the message names none: the one its event carries, as ABP 8/9 send it."""

from __future__ import annotations

from uuid import UUID

from eventrelay import Context, DistributedEventBus, Event
from eventrelay.entity_events import EntityUpdatedEto
from eventrelay.testing import wait_until_idle

ACME = UUID("3fa85f64-5717-4562-b3fc-2c963f66afa6")


class InvoicePaidEto(Event, name="BodyTenantTests.InvoicePaid"):
    tenant_id: UUID | None = None  # ABP's IMultiTenant
    number: int


class CustomerEto(Event, name="BodyTenantTests.Customer"):
    id: int
    tenant_id: UUID | None = None


async def tenants_seen(*publishes: tuple[Event, str | None]) -> list[str | None]:
    seen: list[str | None] = []

    async def record(event: InvoicePaidEto | EntityUpdatedEto[CustomerEto], context: Context) -> None:
        seen.append(context.tenant_id)

    async with DistributedEventBus("Billing", broker="memory://") as bus:
        await bus.subscribe(record)
        for event, tenant in publishes:
            await bus.publish(event, tenant_id=tenant)
            await wait_until_idle(bus)
    return seen


async def test_a_multi_tenant_event_or_an_entity_event_gives_the_handler_its_tenant() -> None:
    updated = EntityUpdatedEto[CustomerEto](entity=CustomerEto(id=1, tenant_id=ACME))
    assert await tenants_seen((InvoicePaidEto(tenant_id=ACME, number=1), None), (updated, None)) == [
        str(ACME),
        str(ACME),
    ]


async def test_the_tenant_header_wins_and_an_event_without_one_has_none() -> None:
    assert await tenants_seen(
        (InvoicePaidEto(tenant_id=ACME, number=1), "other"), (InvoicePaidEto(number=2), None)
    ) == ["other", None]
