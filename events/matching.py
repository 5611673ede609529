"""Matching of offers against requirements, with a reason for each mismatch.

Fit is decided in this one place, so every caller that lists, picks or rejects
offers gives the same reason for the same offer.
Memory and disk compare in GB, GPU names compare case-insensitively, backend
names compare in lower case, and prices compare in USD per hour.
"""

from collections.abc import Callable

from events.grammar import format_range, format_size
from events.model import GpuSpec, Offer, Requirements

__all__ = ["describe_requirements", "format_range", "matches", "mismatch"]


def mismatch(requirements: Requirements, offer: Offer) -> str | None:
    """Return why ``offer`` fails ``requirements``, or None if it satisfies them.

    The reason names the first failed requirement with both values, e.g.
    ``cpu 4 is outside 8..``. Fields are checked in this order: backend, spot
    policy, cpu, memory, GPU (name, count, memory per GPU), disk, price.
    """
    for check in _CHECKS:
        reason = check(requirements, offer)
        if reason is not None:
            return reason

    return None


def matches(requirements: Requirements, offer: Offer) -> bool:
    """Return whether ``offer`` satisfies every field of ``requirements``."""
    return mismatch(requirements, offer) is None


def describe_requirements(requirements: Requirements) -> str:
    """Format the resource part of requirements for tables.

    Examples: ``2..xCPU, 8GB..`` and
    ``4..xCPU, 16GB.., 1..2xA100,H100 (40GB..), 200GB.. (disk)``.
    """
    parts = [
        f"{format_range(requirements.cpu, 'count')}xCPU",
        format_range(requirements.memory, "size"),
    ]
    gpu = requirements.gpu
    if gpu is not None:
        names = ",".join(gpu.names) or "GPU"
        text = f"{format_range(gpu.count, 'count')}x{names}"
        if gpu.memory is not None:
            text += f" ({format_range(gpu.memory, 'size')})"

        parts.append(text)

    if requirements.disk is not None:
        parts.append(f"{format_range(requirements.disk, 'size')} (disk)")

    return ", ".join(parts)


def _check_backend(requirements: Requirements, offer: Offer) -> str | None:
    allowed = requirements.backends
    if allowed is None or offer.backend.lower() in allowed:
        return None

    return f"backend {offer.backend} is not one of {', '.join(allowed) or '(none)'}"


def _check_spot(requirements: Requirements, offer: Offer) -> str | None:
    policy = requirements.spot_policy
    if policy == "spot" and not offer.spot:
        return "on-demand offer but spot policy is spot"

    if policy == "on-demand" and offer.spot:
        return "spot offer but spot policy is on-demand"

    return None


def _check_cpu(requirements: Requirements, offer: Offer) -> str | None:
    cpus = offer.resources.cpus
    if requirements.cpu.contains(cpus):
        return None

    return f"cpu {cpus} is outside {format_range(requirements.cpu, 'count')}"


def _check_memory(requirements: Requirements, offer: Offer) -> str | None:
    memory_gb = offer.resources.memory_gb
    if requirements.memory.contains(memory_gb):
        return None

    return (
        f"memory {format_size(memory_gb)} is outside "
        f"{format_range(requirements.memory, 'size')}"
    )


def _check_gpu(requirements: Requirements, offer: Offer) -> str | None:
    # Without a GPU requirement any GPUs are fine; preferring GPU-less instances
    # for such runs is the scheduler's ranking, not a matching rule.
    spec = requirements.gpu
    if spec is None:
        return None

    for check in (_check_gpu_names, _check_gpu_count, _check_gpu_memory):
        reason = check(spec, offer)
        if reason is not None:
            return reason

    return None


def _check_gpu_names(spec: GpuSpec, offer: Offer) -> str | None:
    if not spec.names:
        return None

    for gpu in offer.resources.gpus:
        if gpu.name.upper() not in spec.names:
            return f"gpu name {gpu.name} is not one of {', '.join(spec.names)}"

    return None


def _check_gpu_count(spec: GpuSpec, offer: Offer) -> str | None:
    count = len(offer.resources.gpus)
    if spec.count.contains(count):
        return None

    return f"gpu count {count} is outside {format_range(spec.count, 'count')}"


def _check_gpu_memory(spec: GpuSpec, offer: Offer) -> str | None:
    # NOTE: an exact memory such as ``A100:80GB`` compares to the reported value,
    # so a GPU that a driver reports as 79.6GB does not match it; ``80GB..`` or a
    # nominal size in the offer avoids that.
    if spec.memory is None:
        return None

    for gpu in offer.resources.gpus:
        if not spec.memory.contains(gpu.memory_gb):
            return (
                f"gpu memory {format_size(gpu.memory_gb)} is outside "
                f"{format_range(spec.memory, 'size')}"
            )

    return None


def _check_disk(requirements: Requirements, offer: Offer) -> str | None:
    # NOTE: an offer that leaves ``disk_gb`` at its default of 0 fails every disk
    # requirement with a positive lower bound.
    disk_gb = offer.resources.disk_gb
    if requirements.disk is None or requirements.disk.contains(disk_gb):
        return None

    return (
        f"disk {format_size(disk_gb)} is outside "
        f"{format_range(requirements.disk, 'size')}"
    )


def _check_price(requirements: Requirements, offer: Offer) -> str | None:
    max_price = requirements.max_price
    if max_price is None or offer.price <= max_price:
        return None

    return (
        f"price {_format_price(offer.price)} is above max price "
        f"{_format_price(max_price)}"
    )


def _format_price(price: float) -> str:
    """Format USD with at least 2 decimals and up to 6, so ``1.2`` is ``1.20``."""
    text = f"{price:.6f}".rstrip("0")
    whole, _, fraction = text.partition(".")

    return f"{whole}.{fraction.ljust(2, '0')}"


_CHECKS: tuple[Callable[[Requirements, Offer], str | None], ...] = (
    _check_backend,
    _check_spot,
    _check_cpu,
    _check_memory,
    _check_gpu,
    _check_disk,
    _check_price,
)
