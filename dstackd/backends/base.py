"""The interface every backend implements, and what its calls return."""

from typing import Protocol

import msgspec

from events.model import Offer, Requirements, Resources


class Provisioned(msgspec.Struct, frozen=True):
    """What a backend reports for an instance it created."""

    resources: Resources
    hostname: str = ""
    backend_data: dict[str, str] = {}


class LiveInstance(msgspec.Struct, frozen=True):
    """An instance as recorded in the log, given back to a backend on start-up."""

    instance_id: str
    offer: Offer
    resources: Resources
    backend_data: dict[str, str]


class BackendError(Exception):
    """A backend call failed; the message names the call, the instance and why."""


class Backend(Protocol):
    """Where instances come from.

    ``instance_id`` is the id recorded by ``InstanceRequested`` before
    ``create`` is called; backends use it as their idempotency token.
    """

    name: str

    async def list_offers(self, requirements: Requirements) -> list[Offer]:
        """Return the offers that satisfy ``requirements``, cheapest first."""
        ...

    async def create(self, instance_id: str, offer: Offer) -> Provisioned:
        """Create an instance from ``offer``; raise ``BackendError`` on failure."""
        ...

    async def terminate(self, instance_id: str, backend_data: dict[str, str]) -> None:
        """Release the instance; succeed if it is already gone."""
        ...

    def restore(self, live: list[LiveInstance]) -> None:
        """Take back the instances the log records as alive, after a restart."""
        ...
