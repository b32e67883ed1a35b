"""The "abp" JSON style: bodies exactly as an ABP service (System.Text.Json, Web defaults, ABP's converters)
writes and reads them, written by hand from those conventions; and the default style left as it was."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from uuid import UUID

import pytest
from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_pascal

from eventrelay import ConfigurationError, DistributedEventBus, Event, Settings
from eventrelay.codec import decode, encode_body
from eventrelay.entity_events import EntityCreatedEto, EntityDeletedEto, EntityEto, EntityUpdatedEto
from eventrelay.envelope import Message
from eventrelay.errors import DecodeError
from eventrelay.json_style import camel_case, dotnet_name
from eventrelay.testing import RecordingBroker, wait_until_idle

USER_ID = UUID("3a0f2b1c-7d5e-4f60-9a8b-1c2d3e4f5a6b")


class AbpUserEto(Event, name="JsonStyleTests.Users.User"):
    """ABP's UserEto (Volo.Abp.Users), as a Python contracts package declares it."""

    id: UUID
    tenant_id: UUID | None = None
    user_name: str
    email: str
    email_confirmed: bool = False


class VersionedUserEto(Event, name="JsonStyleTests.Users.VersionedUser"):
    """An ETO that declares ABP's `IHasEntityVersion` itself."""

    id: UUID
    user_name: str
    entity_version: int = 0


class PriceChangedEto(Event, name="JsonStyleTests.Products.PriceChanged"):
    product_id: UUID
    product_name: str
    old_price: Decimal
    new_price: Decimal
    changed_at: datetime
    sku_id: str = Field(alias="SKU_ID")  # an explicit alias wins, as written
    tags: tuple[str, ...] = ()


class AcronymEto(Event, name="JsonStyleTests.Acronyms"):
    productID: int  # named as the .NET property ProductID
    url_value: str = Field(alias="URLValue")
    io_stream: str = Field(alias="ioStream")


class GeneratedAliasEto(Event, name="JsonStyleTests.GeneratedAlias"):
    """A class that opted into an alias generator before the style existed: its aliases still win."""

    model_config = ConfigDict(alias_generator=to_pascal, populate_by_name=True)

    order_id: int
    note: str = ""


class CartEto(Event, name="JsonStyleTests.Cart"):
    lines: list[PriceChangedEto]
    owner: AbpUserEto | None = None


def message(body: bytes) -> Message:
    return Message("0" * 32, "JsonStyleTests", body)


@pytest.mark.parametrize(
    ("name", "camel"),
    [
        ("ProductId", "productId"),
        ("ProductID", "productID"),
        ("ID", "id"),
        ("Id", "id"),
        ("URLValue", "urlValue"),
        ("IOStream", "ioStream"),
        ("ABC", "abc"),
        ("AB", "ab"),
        ("already", "already"),
        ("X", "x"),
        ("Address1", "address1"),
        ("ÉtéName", "étéName"),
        ("", ""),
    ],
)
def test_names_are_camel_cased_as_system_text_json_does(name: str, camel: str) -> None:
    assert camel_case(name) == camel


@pytest.mark.parametrize(
    ("field", "dotnet"),
    [("product_id", "ProductId"), ("productID", "ProductID"), ("id", "Id"), ("line_2_total", "Line2Total")],
)
def test_a_python_field_has_the_dotnet_name_of_its_parts(field: str, dotnet: str) -> None:
    assert dotnet_name(field) == dotnet


def test_an_eto_is_written_as_abp_writes_it() -> None:
    eto = PriceChangedEto(
        product_id=UUID(int=2),
        product_name="Café crème",
        old_price=Decimal("10.50"),
        new_price=Decimal("9.90"),
        changed_at=datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC),
        SKU_ID="B-1",
    )
    assert (
        encode_body(eto, "abp")
        == (
            '{"productId":"00000000-0000-0000-0000-000000000002","productName":"Café crème",'
            '"oldPrice":10.50,"newPrice":9.90,"changedAt":"2024-05-01T12:00:00.5Z","SKU_ID":"B-1","tags":[]}'
        ).encode()
    )


def test_acronyms_and_explicit_aliases_keep_abps_exact_names() -> None:
    eto = AcronymEto(productID=7, URLValue="u", ioStream="s")
    assert encode_body(eto, "abp") == b'{"productID":7,"URLValue":"u","ioStream":"s"}'
    assert decode(message(b'{"ProductID":7,"urlvalue":"u","IOSTREAM":"s"}'), AcronymEto, 1000, "abp") == eto


def test_an_alias_generator_of_the_class_wins_too() -> None:
    eto = GeneratedAliasEto(order_id=1, note="n")
    assert encode_body(eto, "abp") == b'{"OrderId":1,"Note":"n"}'
    assert decode(message(b'{"orderId":1,"note":"n"}'), GeneratedAliasEto, 1000, "abp") == eto


def test_a_body_as_abp_writes_it_is_read_ignoring_case_with_7_digit_times_and_decimal_numbers() -> None:
    body = (
        b'{"ProductId":"00000000-0000-0000-0000-000000000002","productname":"Caf\xc3\xa9",'
        b'"oldPrice":10.50,"NEWPRICE":0.1000000000000000055511151231,'
        b'"changedAt":"2024-05-01T12:00:00.1234567","sku_id":"B-1","unknownToPython":1}'
    )
    eto = decode(message(body), PriceChangedEto, 10_000, "abp")
    assert isinstance(eto, PriceChangedEto)
    assert eto.product_name == "Café"
    assert eto.old_price == Decimal("10.50")
    assert eto.new_price == Decimal("0.1000000000000000055511151231")  # exact: never through a float
    assert eto.changed_at == datetime(2024, 5, 1, 12, 0, 0, 123456)
    assert eto.sku_id == "B-1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00.1234567Z", datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2024-05-01T12:00:00.1+02:00", datetime(2024, 5, 1, 12, 0, 0, 100000, timezone(timedelta(hours=2)))),
        ("2024-05-01T12:00:00", datetime(2024, 5, 1, 12)),
    ],
)
def test_abps_datetime_formats_are_read(text: str, expected: datetime) -> None:
    body = (
        '{"productId":"00000000-0000-0000-0000-000000000002","productName":"x","oldPrice":1,"newPrice":2,'
        f'"changedAt":"{text}","SKU_ID":"s"}}'
    ).encode()
    eto = decode(message(body), PriceChangedEto, 10_000, "abp")
    assert isinstance(eto, PriceChangedEto)
    assert eto.changed_at == expected


def test_datetimes_are_written_as_dotnet_writes_them() -> None:
    def written(at: datetime) -> bytes:
        eto = PriceChangedEto(
            product_id=UUID(int=1),
            product_name="",
            old_price=Decimal(1),
            new_price=Decimal(1),
            changed_at=at,
            SKU_ID="",
        )
        return encode_body(eto, "abp").split(b'"changedAt":')[1].split(b",")[0]

    assert written(datetime(2024, 5, 1, 12, tzinfo=UTC)) == b'"2024-05-01T12:00:00Z"'
    assert written(datetime(2024, 5, 1, 12, 0, 0, 120)) == b'"2024-05-01T12:00:00.00012"'
    assert written(datetime(2024, 5, 1, 12, tzinfo=timezone(timedelta(hours=-5, minutes=-30)))) == (
        b'"2024-05-01T12:00:00-05:30"'
    )


class TimedEto(Event, name="JsonStyleTests.Timed"):
    took: timedelta
    limit: timedelta | None = None


@pytest.mark.parametrize(
    ("span", "text"),
    [
        (timedelta(minutes=1, seconds=30), "00:01:30"),
        (timedelta(days=1, hours=2, minutes=3, seconds=4, milliseconds=500), "1.02:03:04.5000000"),
        (timedelta(microseconds=1), "00:00:00.0000010"),
        (-timedelta(minutes=1, seconds=30), "-00:01:30"),
    ],
)
def test_a_timedelta_is_a_dotnet_timespan_both_ways(span: timedelta, text: str) -> None:
    body = f'{{"took":"{text}","limit":"{text}"}}'.encode()
    assert encode_body(TimedEto(took=span, limit=span), "abp") == body
    assert decode(message(body), TimedEto, 1000, "abp") == TimedEto(took=span, limit=span)


def test_entity_events_carry_the_version_inside_the_entity_as_abp_does() -> None:
    body = (
        b'{"entity":{"id":"3a0f2b1c-7d5e-4f60-9a8b-1c2d3e4f5a6b","tenantId":null,"userName":"alice",'
        b'"email":"alice@example.com","emailConfirmed":true,"entityVersion":3}}'
    )
    event = EntityUpdatedEto[AbpUserEto](
        entity=AbpUserEto(id=USER_ID, user_name="alice", email="alice@example.com", email_confirmed=True),
        entity_version=3,
    )
    assert encode_body(event, "abp") == body
    assert decode(message(body), EntityUpdatedEto[AbpUserEto], 10_000, "abp") == event
    # Without a version, ABP's body has none either, and reads back so.
    unversioned = EntityDeletedEto[AbpUserEto](entity=event.entity)
    assert b"entityVersion" not in encode_body(unversioned, "abp")
    assert decode(message(encode_body(unversioned, "abp")), EntityDeletedEto[AbpUserEto], 10_000, "abp") == (
        unversioned
    )


def test_an_eto_with_its_own_entity_version_keeps_it_and_the_event_reads_it() -> None:
    body = b'{"entity":{"id":"3a0f2b1c-7d5e-4f60-9a8b-1c2d3e4f5a6b","userName":"bob","entityVersion":5}}'
    event = decode(message(body), EntityCreatedEto[VersionedUserEto], 10_000, "abp")
    assert isinstance(event, EntityCreatedEto)
    assert (event.entity.entity_version, event.entity_version) == (5, 5)
    assert encode_body(event, "abp") == body
    own_only = EntityCreatedEto[VersionedUserEto](entity=event.entity)  # the ETO's field, no event version
    assert encode_body(own_only, "abp") == body


def test_entity_eto_has_abps_names() -> None:
    event = EntityCreatedEto[EntityEto](entity=EntityEto(entity_type="Acme.Book", keys_as_string="7,new"))
    body = b'{"entity":{"entityType":"Acme.Book","keysAsString":"7,new"}}'
    assert encode_body(event, "abp") == body
    assert decode(message(body.replace(b"entityType", b"EntityType")), type(event), 1000, "abp") == event


def test_nested_models_and_lists_of_models_follow_the_style() -> None:
    line = PriceChangedEto(
        product_id=UUID(int=3),
        product_name="Book",
        old_price=Decimal(2),
        new_price=Decimal("1.5"),
        changed_at=datetime(2024, 1, 2),
        SKU_ID="S",
    )
    cart = CartEto(lines=[line], owner=AbpUserEto(id=USER_ID, user_name="al", email="e"))
    body = encode_body(cart, "abp")
    assert body.startswith(
        b'{"lines":[{"productId":"00000000-0000-0000-0000-000000000003","productName":"Book"'
    )
    assert b'"newPrice":1.5,' in body
    assert b'"owner":{"id":"3a0f2b1c' in body
    assert b'"userName":"al"' in body
    shouted = body.replace(b'"productName"', b'"PRODUCTNAME"').replace(b'"userName"', b'"USERNAME"')
    assert decode(message(shouted), CartEto, 10_000, "abp") == cart


def test_the_default_style_is_unchanged() -> None:
    eto = PriceChangedEto(
        product_id=UUID(int=2),
        product_name="x",
        old_price=Decimal("10.50"),
        new_price=Decimal("9.90"),
        changed_at=datetime(2024, 5, 1, 12),
        SKU_ID="B",
    )
    assert encode_body(eto) == eto.model_dump_json(by_alias=True).encode()
    assert b'"old_price":"10.50"' in encode_body(eto)
    with pytest.raises(DecodeError, match="Field required"):  # camelCase is not read by default
        decode(message(encode_body(eto, "abp")), PriceChangedEto, 10_000)
    event = EntityUpdatedEto[AbpUserEto](
        entity=AbpUserEto(id=USER_ID, user_name="a", email="e"), entity_version=2
    )
    assert encode_body(event).endswith(b'},"entity_version":2}')


def test_a_bad_body_is_a_decode_error_in_the_abp_style() -> None:
    with pytest.raises(DecodeError, match="is not JSON"):
        decode(message(b"{not json"), AbpUserEto, 1000, "abp")
    with pytest.raises(DecodeError, match="does not fit AbpUserEto"):
        decode(message(b'{"id":"nope","userName":"a","email":"e"}'), AbpUserEto, 1000, "abp")
    with pytest.raises(DecodeError, match="does not fit"):
        decode(message(b"[1]"), AbpUserEto, 1000, "abp")


def test_settings_take_the_json_style_from_the_environment_and_check_it() -> None:
    assert Settings().json_style == "eventrelay"
    assert Settings.from_env("SVC_", {"SVC_JSON_STYLE": "abp"}).json_style == "abp"
    with pytest.raises(ConfigurationError, match="json_style is one of eventrelay, abp"):
        Settings(json_style="camel")  # type: ignore[arg-type]


class MeasuredEto(Event, name="JsonStyleTests.Measured"):
    value: float


def test_a_float_json_has_no_number_for_is_written_null_as_pydantic_writes_it() -> None:
    assert encode_body(MeasuredEto(value=float("nan")), "abp") == b'{"value":null}'
    assert encode_body(MeasuredEto(value=float("nan"))) == b'{"value":null}'
    assert encode_body(MeasuredEto(value=0.1), "abp") == b'{"value":0.1}'


async def test_a_recording_broker_decodes_in_the_bus_json_style() -> None:
    broker = RecordingBroker()
    sent = AcronymEto(productID=7, URLValue="u", ioStream="s")
    async with DistributedEventBus("Prices", broker=broker, settings=Settings(json_style="abp")) as bus:
        await bus.publish(sent)
        await wait_until_idle(bus)
    assert broker.published[0].body == encode_body(sent, "abp")
    assert broker.events(AcronymEto, "abp") == [sent]
