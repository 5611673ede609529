"""Domain types shared by the log, the daemon and the client: resources,
requirements, offers and idle durations.

Every type is a frozen msgspec Struct so that it can travel in events and on
the socket unchanged. Parsing of the text forms lives in ``events.grammar``;
matching an offer against requirements lives in ``events.matching``.
"""

from typing import Literal

import msgspec

# Seconds as an int, or "off" for never. "Not set" is ``None`` wherever an
# idle duration is optional, so off, 0 and unset stay three distinct values.
Duration = int | Literal["off"]

SpotPolicy = Literal["spot", "on-demand", "auto"]

CreationPolicy = Literal["reuse", "reuse-or-create"]

RunType = Literal["task", "service", "dev-environment"]

# Defaults for the idle duration of an instance, in seconds.
RUN_CREATED_IDLE_DURATION = 5 * 60
POOL_ADDED_IDLE_DURATION = 72 * 60 * 60


class Range(msgspec.Struct, frozen=True, omit_defaults=True):
    """An inclusive range of a quantity; ``None`` on either side is unbounded.

    Units are fixed per field: CPUs and GPUs as counts, memory and disk in GB.
    """

    min: float | None = None
    max: float | None = None

    def contains(self, value: float) -> bool:
        if self.min is not None and value < self.min:
            return False

        return self.max is None or value <= self.max


class GpuSpec(msgspec.Struct, frozen=True, omit_defaults=True):
    """Requested GPUs: accepted names (upper case), memory per GPU and count."""

    names: tuple[str, ...] = ()
    memory: Range | None = None
    count: Range = Range(1, 1)


class Requirements(msgspec.Struct, frozen=True, omit_defaults=True):
    """Resources a run or a pool add requests. An offer must satisfy every field."""

    cpu: Range = Range(2, None)
    memory: Range = Range(8, None)
    gpu: GpuSpec | None = None
    disk: Range | None = None
    spot_policy: SpotPolicy = "on-demand"
    max_price: float | None = None
    backends: tuple[str, ...] | None = None


class Gpu(msgspec.Struct, frozen=True, omit_defaults=True):
    """One GPU of an instance; ``index`` is the device index on its host."""

    name: str
    memory_gb: float
    index: int | None = None


class Resources(msgspec.Struct, frozen=True, omit_defaults=True):
    """What an instance has. Memory and disk in GB."""

    cpus: int
    memory_gb: float
    gpus: tuple[Gpu, ...] = ()
    disk_gb: float = 0.0

    def describe(self) -> str:
        """Format as a short text for tables, e.g. ``4xCPU, 16GB, 1xA100 (80GB)``."""
        parts = [f"{self.cpus}xCPU", f"{_format_gb(self.memory_gb)}"]
        if self.gpus:
            first = self.gpus[0]
            parts.append(
                f"{len(self.gpus)}x{first.name} ({_format_gb(first.memory_gb)})"
            )

        if self.disk_gb:
            parts.append(f"{_format_gb(self.disk_gb)} (disk)")

        return ", ".join(parts)


class Offer(msgspec.Struct, frozen=True, omit_defaults=True):
    """An instance a backend can create now, with its hourly price in USD."""

    backend: str
    region: str
    instance_type: str
    resources: Resources
    spot: bool = False
    price: float = 0.0


class Actor(msgspec.Struct, frozen=True, array_like=True):
    """Who caused an event: a caller's uid and user name, or the daemon itself."""

    uid: int | None
    name: str


DAEMON_ACTOR = Actor(None, "dstackd")


def _format_gb(value: float) -> str:
    if value >= 1024 and value % 1024 == 0:
        return f"{value / 1024:g}TB"

    return f"{value:g}GB"
