"""IdentityService's contracts: the ETOs other services may depend on (ABP's *.Application.Contracts).

`UserEto` is ABP's `Volo.Abp.Users.UserEto` (package Volo.Abp.Users.Abstractions, ABP 8/9), field for field
and in its order, so this sample stands in for an ABP IdentityService and a Python service can take the user
events of a real one. The Python names are snake_case; on the wire they are what the bus's JSON convention
makes of them (ABP's camelCase, `userName`, under `json_style="abp"`).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from pydantic import Field

from eventrelay import Event


class UserEto(Event, name="Volo.Abp.Users.User"):
    """A user, as IdentityService publishes it in EntityCreated/Updated/DeletedEto[UserEto] (ABP's name).

    ABP's `UserEto : IEntityEto<Guid>, IUserData, IMultiTenant`. `tenant_id` is the user's tenant (None: the
    host), which is how ABP tells a handler the tenant of a user event. `entity_version` is the user's
    version, carried inside the entity as ABP does (0 when created, one more per update). `extra_properties`
    is ABP's `ExtraPropertyDictionary` (module extension properties), `{}` when there are none.
    """

    id: UUID
    tenant_id: UUID | None = None
    user_name: str
    name: str | None = None
    surname: str | None = None
    is_active: bool = True
    email: str
    email_confirmed: bool = False
    phone_number: str | None = None
    phone_number_confirmed: bool = False
    entity_version: int = 0
    extra_properties: dict[str, Any] = Field(default_factory=dict)
