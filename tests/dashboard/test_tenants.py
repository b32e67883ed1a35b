"""With a database per tenant, the service page shows each tenant database's outbox and dead letters, read
from real SQLite files, its tenant ids escaped."""

from __future__ import annotations

import re
from pathlib import Path

from eventrelay import MemoryBroker, TenantDatabases
from eventrelay.service import Service
from tests.bus.helpers import eventually
from tests.dashboard.support import SETTINGS, XSS, OrderPlaced, Shop, dashboard


async def test_the_service_page_shows_each_tenant_database(tmp_path: Path) -> None:
    odd = f"acme{XSS}"
    databases = {
        odd: f"sqlite+aiosqlite:///{tmp_path}/acme.db",
        "globex": f"sqlite+aiosqlite:///{tmp_path}/g.db",
    }
    orders = Service(
        "Orders",
        database=f"sqlite+aiosqlite:///{tmp_path}/orders.db",
        broker=MemoryBroker(),
        tenants=TenantDatabases(databases),
        settings=SETTINGS,
    )
    orders.subscribe(Shop().ship, event=OrderPlaced, name="ship")
    async with orders:
        bus = orders.bus
        async with bus.tenant(odd):
            for _ in range(2):
                await bus.publish(OrderPlaced(item="later"), delay=3600)
        await bus.publish(OrderPlaced(item="poison"), tenant_id="globex")

        async def rejected() -> bool:
            async with bus.tenant("globex"):
                return len(await bus.dead_letters()) == 1

        await eventually(rejected, timeout=10)
    async with dashboard([orders]) as client:
        page = (await client.get("/services/Orders")).body

    section = page.partition("<h2>Tenant databases</h2>")[2].partition("<h2>Dead letters</h2>")[0]
    default, acme, globex = re.findall(r"<tr><td>.*?</tr>", section)
    assert default.startswith('<tr><td><span class="muted">default</span></td><td class="num">0</td>')
    assert acme.startswith(
        '<tr><td>acme&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;</td><td class="num">2</td>'
    )
    assert " s</td>" in acme  # how long the oldest has waited
    assert globex.endswith('<td class="num bad">1</td></tr>')
    assert XSS not in page
    assert '<p class="ok">No dead letters.</p>' in page  # the default database's
