"""The local backend: this machine's CPUs, memory, disk and GPUs, carved into
instances that never overlap.

An instance is a reservation of part of the machine: a set of CPU ids, an amount
of memory, a set of GPU indices and an amount of disk. ``LocalBackend`` owns the
table of reservations in memory. The log is the durable copy, because each
reservation travels in ``InstanceProvisioned.backend_data``, and ``restore``
rebuilds the table from it after a restart. Memory and disk are bookkeeping
only, which the backend does not enforce on processes. The runner enforces CPU
ids and GPU indices through CPU affinity and ``CUDA_VISIBLE_DEVICES``.
"""

import math
import os
import re
import shutil
import socket
import threading
from collections.abc import Iterable
from types import ModuleType

import msgspec
import structlog

from dstackd.backends.base import BackendError, LiveInstance, Provisioned
from events.errors import InvalidValueError
from events.matching import mismatch
from events.model import Gpu, Offer, Requirements, Resources

log = structlog.get_logger(__name__)

BACKEND_NAME = "local"

# How many slices larger than the minimal one an offer list may contain.
MAX_LARGER_SLICES = 3

# Memory and disk are floats in GB. Sums and differences are rounded to this many
# decimals, and comparisons allow this much slack, so that float noise never
# turns "exactly fits" into "does not fit".
_GB_DECIMALS = 6
_GB_SLACK = 1e-6

_FALLBACK_MEMORY_GB = 1.0


class Capacity(msgspec.Struct, frozen=True):
    """A machine's resources, or the free part of them, with device ids.

    Every GPU carries its ``index``: for detected GPUs the CUDA device index
    under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (the runner sets it), for declared
    ones the declared index.
    """

    cpu_ids: tuple[int, ...]
    memory_gb: float
    disk_gb: float
    gpus: tuple[Gpu, ...] = ()


class LocalInventory(msgspec.Struct, frozen=True):
    """Declared resources of this machine, overriding detection field by field.

    ``None`` means "detect it". Declared GPUs without an ``index`` get the lowest
    indices not taken by the others, in declaration order. ``price_per_hour`` is
    the price in USD of the whole machine. A slice costs that price times the
    largest share it takes of the machine's CPUs, memory or GPUs.
    """

    cpus: int | None = None
    memory_gb: float | None = None
    disk_gb: float | None = None
    gpus: list[Gpu] | None = None
    price_per_hour: float = 0.0
    region: str = "local"


class Reservation(msgspec.Struct, frozen=True):
    """The part of the machine reserved for one instance."""

    cpu_ids: tuple[int, ...]
    memory_gb: float
    gpu_indices: tuple[int, ...] = ()
    disk_gb: float = 0.0

    def to_backend_data(self) -> dict[str, str]:
        """Encode as the ``backend_data`` strings stored in the log."""
        return {
            "cpu_ids": _format_ids(self.cpu_ids),
            "gpu_indices": _format_ids(self.gpu_indices),
            "memory_gb": _format_gb(self.memory_gb),
            "disk_gb": _format_gb(self.disk_gb),
        }

    @classmethod
    def from_backend_data(cls, data: dict[str, str]) -> "Reservation":
        """Decode ``backend_data`` written by ``to_backend_data``.

        Raises:
            BackendError: a key is missing or a value is malformed.
        """
        try:
            return cls(
                cpu_ids=_parse_ids(data["cpu_ids"]),
                memory_gb=float(data["memory_gb"]),
                gpu_indices=_parse_ids(data.get("gpu_indices", "")),
                disk_gb=float(data.get("disk_gb", "0")),
            )
        except (KeyError, ValueError) as exc:
            raise BackendError(
                f"invalid local backend_data {data!r}: {exc!r}; expected cpu_ids, "
                "memory_gb, gpu_indices and disk_gb as written by the local backend"
            ) from exc


# Detection


def detect_resources(data_dir: str) -> Capacity:
    """Detect this machine's CPUs, memory, disk and NVIDIA GPUs."""
    return Capacity(
        cpu_ids=detect_cpu_ids(),
        memory_gb=detect_memory_gb(),
        disk_gb=detect_disk_gb(data_dir),
        gpus=detect_gpus(),
    )


def detect_cpu_ids() -> tuple[int, ...]:
    """Return the ids of the CPUs this process may run on."""
    return tuple(sorted(os.sched_getaffinity(0)))


def detect_memory_gb(meminfo_path: str = "/proc/meminfo") -> float:
    """Read ``MemTotal`` from ``/proc/meminfo``, in GB rounded down to 0.1 GB."""
    with open(meminfo_path, encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                kilobytes = int(line.split()[1])
                return math.floor(kilobytes / 1024**2 * 10) / 10

    raise BackendError(f"MemTotal not found in {meminfo_path}")


def detect_disk_gb(data_dir: str) -> float:
    """Return the free space of the file system of ``data_dir``, in whole GB.

    The nearest existing parent is measured when ``data_dir`` does not exist yet.
    """
    path = os.path.abspath(data_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)

    return float(shutil.disk_usage(path).free // 1024**3)


def detect_gpus() -> tuple[Gpu, ...]:
    """List NVIDIA GPUs through NVML, or none when the library or driver is missing.

    Memory is the total per GPU in GB, rounded to the nearest GB. Indices follow
    the PCI bus id, which is the order CUDA numbers devices in under
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (the runner sets it). NVML's own index
    order is not used, because NVML documents it as unrelated to CUDA's and
    not stable across reboots.
    """
    try:
        import pynvml
    except ImportError:
        log.debug("gpu_detection_skipped", reason="nvidia-ml-py is not installed")
        return ()

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.debug("gpu_detection_skipped", reason=str(exc))
        return ()

    try:
        devices = [_read_nvml_device(pynvml, i) for i in _nvml_indices(pynvml)]
    except pynvml.NVMLError as exc:
        log.warning("gpu_detection_failed", error=str(exc))
        return ()
    finally:
        pynvml.nvmlShutdown()

    devices.sort()

    return tuple(
        Gpu(name=name, memory_gb=memory_gb, index=index)
        for index, (_, name, memory_gb) in enumerate(devices)
    )


def _nvml_indices(pynvml: ModuleType) -> range:
    return range(pynvml.nvmlDeviceGetCount())


def _read_nvml_device(pynvml: ModuleType, index: int) -> tuple[str, str, float]:
    """Return the PCI bus id, short name and memory in GB of one device."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = _text(pynvml.nvmlDeviceGetName(handle))
    bus_id = _text(pynvml.nvmlDeviceGetPciInfo(handle).busId).upper()
    total_bytes = pynvml.nvmlDeviceGetMemoryInfo(handle).total

    return bus_id, short_gpu_name(name), float(round(total_bytes / 1024**3))


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes where newer ones return str.
    return value.decode() if isinstance(value, bytes) else value


_VENDOR_WORDS = {"NVIDIA", "TESLA", "GEFORCE", "QUADRO", "GENERATION"}
_VARIANT_WORD_RE = re.compile(r"PCIE|SXM\d*|NVL|HBM\d*E?|\d+GB", re.IGNORECASE)


def short_gpu_name(nvml_name: str) -> str:
    """Shorten an NVML device name to the name requirements use.

    Vendor and product-line words, form factors and memory sizes are dropped:
    ``NVIDIA A100-SXM4-80GB`` becomes ``A100``, ``NVIDIA H100 80GB HBM3`` becomes
    ``H100``, ``NVIDIA GeForce RTX 4090`` becomes ``RTX4090``, ``NVIDIA RTX
    A6000`` becomes ``A6000``. Declare GPUs in the inventory where this
    heuristic picks a name the users do not expect.
    """
    words = nvml_name.split("-")[0].split()
    model_words = [
        word
        for word in words
        if word.upper() not in _VENDOR_WORDS and not _VARIANT_WORD_RE.fullmatch(word)
    ]
    if (
        len(model_words) > 1
        and model_words[0].upper() == "RTX"
        and re.fullmatch(r"A\d+", model_words[1])
    ):
        model_words = model_words[1:]

    return "".join(model_words) or nvml_name.strip()


# The backend


class LocalBackend:
    """Instances carved out of this machine; see the module docstring.

    Args:
        inventory: declared resources; undeclared ones are detected.
        data_dir: the daemon's data directory, whose file system gives the disk.
    """

    name = BACKEND_NAME
    # Offers are the free capacity, which counts only created reservations, so
    # the scheduler requests one local instance at a time.
    provisions_serially = True

    def __init__(
        self, inventory: LocalInventory | None = None, *, data_dir: str
    ) -> None:
        self._inventory = inventory or LocalInventory()
        self._machine = _resolve_capacity(data_dir, self._inventory)
        self._gpus_by_index = {gpu.index: gpu for gpu in self._machine.gpus}
        self._reservations: dict[str, Reservation] = {}
        self._lock = threading.Lock()

    @property
    def machine(self) -> Capacity:
        """The whole machine as this backend models it: detected or declared."""
        return self._machine

    def free_capacity(self) -> Capacity:
        """Return the capacity that no reservation takes."""
        with self._lock:
            return self._free_capacity_locked()

    async def list_offers(self, requirements: Requirements) -> list[Offer]:
        """Return slices of the free capacity that satisfy ``requirements``.

        The minimal slice (the minimum of each range) comes first among equals,
        then up to ``MAX_LARGER_SLICES`` slices with CPUs and memory doubled
        each time, capped by the ranges' maximum and the free capacity. Sorted
        by price, then by size.
        """
        free = self.free_capacity()
        offers: dict[str, Offer] = {}
        for gpus in _gpu_choices(requirements, free.gpus):
            for cpus, memory_gb in _slice_sizes(requirements, free, self._machine):
                offer = self._offer(cpus, memory_gb, gpus, _disk_gb(requirements))
                if offer.resources.disk_gb > free.disk_gb + _GB_SLACK:
                    continue

                if mismatch(requirements, offer) is None:
                    offers.setdefault(offer.instance_type, offer)

        return sorted(offers.values(), key=_offer_order)

    async def create(self, instance_id: str, offer: Offer) -> Provisioned:
        """Reserve the CPUs, memory, GPUs and disk that ``offer`` describes.

        Calling again with the same ``instance_id`` returns the same
        reservation.

        Raises:
            BackendError: the offer is not a local one, or it no longer fits.
        """
        if offer.backend != self.name:
            raise BackendError(
                f"create instance {instance_id}: offer of backend {offer.backend!r} "
                f"given to the {self.name!r} backend"
            )

        with self._lock:
            reservation = self._reservations.get(instance_id)
            if reservation is None:
                free = self._free_capacity_locked()
                reservation = _reserve(instance_id, offer.resources, free)
                self._reservations[instance_id] = reservation

        log.debug(
            "local_instance_reserved",
            instance_id=instance_id,
            **reservation.to_backend_data(),
        )

        return self._provisioned(reservation)

    async def terminate(self, instance_id: str, backend_data: dict[str, str]) -> None:
        """Free the instance's reservation; nothing happens if there is none."""
        with self._lock:
            reservation = self._reservations.pop(instance_id, None)

        if reservation is not None:
            log.debug("local_instance_released", instance_id=instance_id)

    def restore(self, live: list[LiveInstance]) -> None:
        """Re-reserve the local instances the log records as alive.

        An instance whose recorded reservation is malformed or overlaps one
        restored before it is skipped with an error log, so its CPUs and GPUs
        may be handed out again: the log contains a conflict no restart can fix.
        """
        with self._lock:
            for instance in live:
                if instance.offer.backend == self.name:
                    self._restore_locked(instance)

    def _restore_locked(self, instance: LiveInstance) -> None:
        if instance.instance_id in self._reservations:
            return

        try:
            reservation = Reservation.from_backend_data(instance.backend_data)
        except BackendError as exc:
            log.error(
                "local_instance_restore_failed",
                instance_id=instance.instance_id,
                error=str(exc),
            )
            return

        conflict = _find_overlap(reservation, self._reservations)
        if conflict is not None:
            log.error(
                "local_instance_restore_failed",
                instance_id=instance.instance_id,
                error=f"reservation overlaps instance {conflict}",
                **instance.backend_data,
            )
            return

        self._reservations[instance.instance_id] = reservation

    def _free_capacity_locked(self) -> Capacity:
        used_cpus: set[int] = set()
        used_gpus: set[int] = set()
        used_memory = 0.0
        used_disk = 0.0
        for reservation in self._reservations.values():
            used_cpus.update(reservation.cpu_ids)
            used_gpus.update(reservation.gpu_indices)
            used_memory += reservation.memory_gb
            used_disk += reservation.disk_gb

        machine = self._machine

        return Capacity(
            cpu_ids=tuple(i for i in machine.cpu_ids if i not in used_cpus),
            memory_gb=_round_gb(machine.memory_gb - used_memory),
            disk_gb=_round_gb(machine.disk_gb - used_disk),
            gpus=tuple(gpu for gpu in machine.gpus if gpu.index not in used_gpus),
        )

    def _offer(
        self, cpus: int, memory_gb: float, gpus: tuple[Gpu, ...], disk_gb: float
    ) -> Offer:
        resources = Resources(
            cpus=cpus, memory_gb=memory_gb, gpus=gpus, disk_gb=disk_gb
        )

        return Offer(
            backend=self.name,
            region=self._inventory.region,
            instance_type=_instance_type(resources),
            resources=resources,
            spot=False,
            price=self._price(resources),
        )

    def _price(self, resources: Resources) -> float:
        machine = self._machine
        shares = [
            resources.cpus / len(machine.cpu_ids),
            resources.memory_gb / machine.memory_gb,
        ]
        if machine.gpus:
            shares.append(len(resources.gpus) / len(machine.gpus))

        return round(self._inventory.price_per_hour * max(shares), 6)

    def _provisioned(self, reservation: Reservation) -> Provisioned:
        # A restored reservation may name GPUs that a changed inventory dropped.
        gpus = tuple(
            self._gpus_by_index[i]
            for i in reservation.gpu_indices
            if i in self._gpus_by_index
        )
        resources = Resources(
            cpus=len(reservation.cpu_ids),
            memory_gb=reservation.memory_gb,
            gpus=gpus,
            disk_gb=reservation.disk_gb,
        )

        return Provisioned(
            resources=resources,
            hostname=socket.gethostname(),
            backend_data=reservation.to_backend_data(),
        )


# Inventory


def _resolve_capacity(data_dir: str, inventory: LocalInventory) -> Capacity:
    """Combine the declared inventory with detection of what it leaves out.

    A detector runs only for a field the inventory leaves undeclared, so a
    declared GPU list never loads NVML. CPU ids are always detected, because
    declared CPUs take the real ids first.
    """
    cpu_ids = detect_cpu_ids()
    if inventory.cpus is not None:
        _check_positive("local.cpus", inventory.cpus)
        cpu_ids = _declared_cpu_ids(inventory.cpus, cpu_ids)

    memory_gb = inventory.memory_gb
    if memory_gb is None:
        memory_gb = detect_memory_gb()
    else:
        _check_positive("local.memory", memory_gb)

    disk_gb = inventory.disk_gb
    if disk_gb is None:
        disk_gb = detect_disk_gb(data_dir)
    elif disk_gb < 0:
        raise InvalidValueError("local.disk", disk_gb, "a non-negative size in GB")

    if inventory.gpus is None:
        gpus = detect_gpus()
    else:
        gpus = _index_gpus(inventory.gpus)

    return Capacity(
        cpu_ids=cpu_ids, memory_gb=float(memory_gb), disk_gb=float(disk_gb), gpus=gpus
    )


def _check_positive(field: str, value: float) -> None:
    if value <= 0:
        raise InvalidValueError(field, value, "a positive number")


def _declared_cpu_ids(count: int, real_ids: tuple[int, ...]) -> tuple[int, ...]:
    """Pick ``count`` CPU ids: the real ones first, then ids past the highest.

    Ids past the real ones exist only on paper; the runner drops them from a
    run's CPU affinity.
    """
    if count <= len(real_ids):
        return real_ids[:count]

    next_id = max(real_ids, default=-1) + 1
    extra = range(next_id, next_id + count - len(real_ids))

    return real_ids + tuple(extra)


def _index_gpus(gpus: Iterable[Gpu]) -> tuple[Gpu, ...]:
    declared = list(gpus)
    taken_indices = [gpu.index for gpu in declared if gpu.index is not None]
    duplicates = sorted({i for i in taken_indices if taken_indices.count(i) > 1})
    if duplicates:
        raise InvalidValueError(
            "local.gpus", duplicates, "each GPU index declared at most once"
        )

    free_indices = (
        i for i in range(len(declared) + len(taken_indices)) if i not in taken_indices
    )
    indexed = []
    for gpu in declared:
        index = next(free_indices) if gpu.index is None else gpu.index
        indexed.append(Gpu(gpu.name, float(gpu.memory_gb), index))

    return tuple(sorted(indexed, key=lambda gpu: gpu.index or 0))


# Offers


def _gpu_choices(
    requirements: Requirements, free_gpus: tuple[Gpu, ...]
) -> list[tuple[Gpu, ...]]:
    """List the GPU sets a slice may take: one per GPU model with enough free."""
    spec = requirements.gpu
    count = 0 if spec is None else _ceil_count(spec.count.min)
    if count == 0:
        return [()]

    by_model: dict[tuple[str, float], int] = {}
    for gpu in free_gpus:
        key = (gpu.name, gpu.memory_gb)
        by_model[key] = by_model.get(key, 0) + 1

    return [
        (Gpu(name, memory_gb),) * count
        for (name, memory_gb), available in sorted(by_model.items())
        if available >= count
    ]


def _slice_sizes(
    requirements: Requirements, free: Capacity, machine: Capacity
) -> list[tuple[int, float]]:
    """List (CPUs, memory GB) pairs: the minimal slice, then doublings."""
    cpus = max(1, _ceil_count(requirements.cpu.min))
    if requirements.memory.min is not None:
        memory_gb = float(requirements.memory.min)
    else:
        # No minimum: take the machine's memory per CPU for each CPU.
        share = machine.memory_gb * cpus / len(machine.cpu_ids)
        memory_gb = max(math.floor(share * 10) / 10, _FALLBACK_MEMORY_GB)
        memory_gb = min(memory_gb, requirements.memory.max or math.inf)

    if cpus > len(free.cpu_ids) or memory_gb > free.memory_gb + _GB_SLACK:
        return []

    cpu_cap = min(_floor_bound(requirements.cpu.max), len(free.cpu_ids))
    memory_cap = min(requirements.memory.max or math.inf, free.memory_gb)
    sizes = [(cpus, memory_gb)]
    for _ in range(MAX_LARGER_SLICES):
        previous_cpus, previous_memory = sizes[-1]
        larger = (
            max(previous_cpus, min(previous_cpus * 2, cpu_cap)),
            max(previous_memory, _round_gb(min(previous_memory * 2, memory_cap))),
        )
        if larger == sizes[-1]:
            break

        sizes.append(larger)

    return sizes


def _disk_gb(requirements: Requirements) -> float:
    if requirements.disk is None or requirements.disk.min is None:
        return 0.0

    return float(requirements.disk.min)


def _ceil_count(value: float | None) -> int:
    return 0 if value is None else math.ceil(value - _GB_SLACK)


def _floor_bound(value: float | None) -> float:
    return math.inf if value is None else math.floor(value + _GB_SLACK)


def _instance_type(resources: Resources) -> str:
    name = f"local-{resources.cpus}c-{resources.memory_gb:g}g"
    if resources.gpus:
        name += f"-{len(resources.gpus)}x{resources.gpus[0].name}"

    return name


def _offer_order(offer: Offer) -> tuple[float, int, float, int, float]:
    resources = offer.resources

    return (
        offer.price,
        len(resources.gpus),
        resources.memory_gb,
        resources.cpus,
        resources.gpus[0].memory_gb if resources.gpus else 0.0,
    )


# Reservations


def _reserve(instance_id: str, requested: Resources, free: Capacity) -> Reservation:
    """Pick concrete CPU ids and GPU indices for ``requested`` out of ``free``."""
    if requested.cpus > len(free.cpu_ids):
        raise _does_not_fit(instance_id, f"{requested.cpus} CPUs", free)

    if requested.memory_gb > free.memory_gb + _GB_SLACK:
        raise _does_not_fit(instance_id, f"{requested.memory_gb:g}GB of memory", free)

    if requested.disk_gb > free.disk_gb + _GB_SLACK:
        raise _does_not_fit(instance_id, f"{requested.disk_gb:g}GB of disk", free)

    remaining = list(free.gpus)
    gpu_indices = []
    for gpu in requested.gpus:
        found = next((g for g in remaining if _same_gpu_model(g, gpu)), None)
        if found is None or found.index is None:
            requested_gpus = f"{len(requested.gpus)}x{gpu.name} ({gpu.memory_gb:g}GB)"
            raise _does_not_fit(instance_id, requested_gpus, free)

        remaining.remove(found)
        gpu_indices.append(found.index)

    return Reservation(
        cpu_ids=free.cpu_ids[: requested.cpus],
        memory_gb=requested.memory_gb,
        gpu_indices=tuple(sorted(gpu_indices)),
        disk_gb=requested.disk_gb,
    )


def _same_gpu_model(candidate: Gpu, wanted: Gpu) -> bool:
    return (
        candidate.name.upper() == wanted.name.upper()
        and abs(candidate.memory_gb - wanted.memory_gb) <= _GB_SLACK
    )


def _does_not_fit(instance_id: str, requested: str, free: Capacity) -> BackendError:
    free_gpus = ", ".join(f"{g.name} #{g.index}" for g in free.gpus) or "none"

    return BackendError(
        f"create local instance {instance_id}: {requested} requested but the machine "
        f"has {len(free.cpu_ids)} CPUs, {free.memory_gb:g}GB of memory, "
        f"{free.disk_gb:g}GB of disk and GPUs {free_gpus} free; list the offers "
        "again or terminate idle instances"
    )


def _find_overlap(
    reservation: Reservation, reservations: dict[str, Reservation]
) -> str | None:
    for instance_id, other in reservations.items():
        shares_cpu = not set(reservation.cpu_ids).isdisjoint(other.cpu_ids)
        shares_gpu = not set(reservation.gpu_indices).isdisjoint(other.gpu_indices)
        if shares_cpu or shares_gpu:
            return instance_id

    return None


# Encoding


def _round_gb(value: float) -> float:
    return round(value, _GB_DECIMALS)


def _format_gb(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _format_ids(ids: Iterable[int]) -> str:
    return ",".join(str(i) for i in ids)


def _parse_ids(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())
