"""IdentityService's contracts: the ETOs other services may depend on (ABP's *.Application.Contracts)."""

from __future__ import annotations

from uuid import UUID

from eventrelay import Event


class UserEto(Event, name="Volo.Abp.Users.User"):
    """A user, as IdentityService publishes it in EntityCreated/Updated/DeletedEto[UserEto] (ABP's name)."""

    id: UUID
    user_name: str
    name: str
    email: str
