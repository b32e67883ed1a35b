"""What an ABP service does on RabbitMQ, for the tests that put a Python service beside one."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractQueue
from aiormq import spec


async def publish_as_abp(
    server: str, exchange: str, routing_key: str, body: bytes, properties: spec.Basic.Properties
) -> None:
    """What `RabbitMqDistributedEventBus.PublishAsync` sends: the exchange declared direct and durable, the
    routing key = the event name, mandatory false, and only the properties ABP sets."""
    async with await aio_pika.connect(server) as connection:
        channel = await (await connection.channel()).get_underlay_channel()
        await channel.exchange_declare(exchange, exchange_type="direct", durable=True)
        await channel.basic_publish(
            body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=False
        )


async def declare_as_abp_consumer(
    connection: AbstractConnection, exchange: str, queue_name: str, routing_key: str
) -> AbstractQueue:
    """What `RabbitMqMessageConsumer` declares: the exchange (direct, durable, no arguments: an alternate
    exchange would make this fail), a durable queue named after the ABP service's ClientName, bound to the
    event name."""
    channel = await connection.channel()
    await channel.declare_exchange(exchange, "direct", durable=True)
    queue = await channel.declare_queue(queue_name, durable=True)
    await queue.bind(exchange, routing_key)
    return queue
