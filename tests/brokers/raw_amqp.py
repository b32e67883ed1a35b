"""Publish a message whose content header is raw bytes: what a hostile or broken client sends.

aio-pika and aiormq encode properties through pamqp, which refuses what we want to send (a headers table
nested thousands deep raises RecursionError while encoding, a message id must be text). This client speaks
just enough AMQP 0-9-1 over a socket to log in, publish one message with publisher confirms and leave.
"""

from __future__ import annotations

import asyncio
import struct

from pamqp import body, commands, constants, frame, header

PROPERTY_FLAGS = commands.Basic.Properties.flags
"""The bit of each property in a content header's property flags (AMQP 0-9-1, 4.2.6.1)."""


def nested_table(depth: int) -> bytes:
    """A field table nested `depth` deep: {"d": {"d": ... {}}}, encoded from the inside out."""
    table = struct.pack(">I", 0)
    for _ in range(depth):
        entry = b"\x01dF" + table  # key "d", type F (a field table), the table inside
        table = struct.pack(">I", len(entry)) + entry
    return table


def short_string(value: bytes) -> bytes:
    """A shortstr whose bytes go as they are (pamqp would check and encode text)."""
    return bytes([len(value)]) + value


def content_header(channel: int, body_size: int, properties: dict[str, bytes]) -> bytes:
    """A content header frame with properties given as their encoded bytes, name -> bytes."""
    flags = 0
    encoded = b""
    for name in commands.Basic.Properties.__slots__:  # in the order the header carries them
        if name in properties:
            flags |= PROPERTY_FLAGS[name]
            encoded += properties[name]
    content = struct.pack(">HHQH", commands.Basic.frame_id, 0, body_size, flags) + encoded
    return struct.pack(">BHI", constants.FRAME_HEADER, channel, len(content)) + content + b"\xce"


async def publish_raw(
    port: int, exchange: str, routing_key: str, properties: dict[str, bytes], payload: bytes
) -> None:
    """Publish `payload` to `exchange` with properties given as their encoded bytes, name -> bytes, and wait
    for the broker's confirm."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""

    async def receive() -> object:
        nonlocal received
        while True:
            _, _, size = frame.frame_parts(received)
            if size is not None and len(received) >= constants.FRAME_HEADER_SIZE + size + 1:
                consumed, _, value = frame.unmarshal(received)
                received = received[consumed:]
                if isinstance(value, commands.Connection.Close | commands.Channel.Close):
                    raise ConnectionError(f"RabbitMQ closed: {value.reply_text}")
                return value
            if not (chunk := await reader.read(65536)):
                raise ConnectionError("RabbitMQ closed the connection")
            received += chunk

    def send(value: frame.FrameTypes, channel: int) -> None:
        writer.write(frame.marshal(value, channel))

    try:
        writer.write(header.ProtocolHeader().marshal())
        await receive()  # Connection.Start
        send(commands.Connection.StartOk(mechanism="PLAIN", response="\0guest\0guest"), 0)
        tune = await receive()
        assert isinstance(tune, commands.Connection.Tune)
        send(commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0), 0)
        send(commands.Connection.Open("/"), 0)
        await receive()  # Connection.OpenOk
        send(commands.Channel.Open(), 1)
        await receive()  # Channel.OpenOk
        send(commands.Confirm.Select(), 1)
        await receive()  # Confirm.SelectOk
        send(commands.Basic.Publish(exchange=exchange, routing_key=routing_key), 1)
        writer.write(content_header(1, len(payload), properties))
        send(body.ContentBody(payload), 1)
        confirm = await receive()
        assert isinstance(confirm, commands.Basic.Ack), confirm
        send(commands.Connection.Close(constants.REPLY_SUCCESS, "Normal shutdown", 0, 0), 0)
        await receive()  # Connection.CloseOk
    finally:
        writer.close()
        await writer.wait_closed()
