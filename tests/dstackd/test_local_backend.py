"""Tests of the local backend: detection, declared inventory, offers and
non-overlapping reservations."""

import os
import sys
import tempfile
import types
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from dstackd.backends.base import BackendError, LiveInstance
from dstackd.backends.local import (
    Capacity,
    LocalBackend,
    LocalInventory,
    Reservation,
    detect_cpu_ids,
    detect_gpus,
    detect_memory_gb,
    detect_resources,
    short_gpu_name,
)
from events.errors import InvalidValueError
from events.grammar import build_requirements
from events.matching import matches
from events.model import Gpu, Offer, Requirements, Resources

A100 = Gpu(name="A100", memory_gb=80.0)
T4 = Gpu(name="T4", memory_gb=16.0)


class FakeNvml(types.ModuleType):
    """The part of the ``pynvml`` module that detection calls."""

    class NVMLError(Exception):
        pass

    def __init__(
        self, devices: list[tuple[Any, Any, int]], init_error: str | None = None
    ) -> None:
        super().__init__("pynvml")
        self.devices = devices
        self.init_error = init_error
        self.shut_down = False

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> Any:
        return self.devices[handle][0]

    def nvmlDeviceGetPciInfo(self, handle: int) -> Any:
        return types.SimpleNamespace(busId=self.devices[handle][1])

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return types.SimpleNamespace(total=self.devices[handle][2])


@pytest.fixture
def data_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="dsd-local-", dir="/tmp")
    yield path
    os.rmdir(path)


def make_backend(data_dir: str, **inventory: Any) -> LocalBackend:
    """A backend on a declared machine: 8 CPUs, 64GB, 500GB of disk, 4 A100s."""
    fields: dict[str, Any] = {
        "cpus": 8,
        "memory_gb": 64.0,
        "disk_gb": 500.0,
        "gpus": [A100] * 4,
    }
    fields.update(inventory)

    return LocalBackend(LocalInventory(**fields), data_dir=data_dir)


async def first_offer(backend: LocalBackend, **requirements: str) -> Offer:
    offers = await backend.list_offers(build_requirements(**requirements))
    assert offers, f"no offers for {requirements}"

    return offers[0]


class TestDetection:
    def test_detect_cpu_ids_matches_affinity(self) -> None:
        assert detect_cpu_ids() == tuple(sorted(os.sched_getaffinity(0)))

    def test_detect_memory_reads_memtotal(self, data_dir: str) -> None:
        path = os.path.join(data_dir, "meminfo")
        with open(path, "w") as meminfo:
            meminfo.write("MemFree:  1024 kB\nMemTotal:       16777216 kB\n")

        try:
            assert detect_memory_gb(path) == 16.0
        finally:
            os.unlink(path)

    def test_detect_memory_rounds_down_to_tenths(self, data_dir: str) -> None:
        path = os.path.join(data_dir, "meminfo")
        with open(path, "w") as meminfo:
            meminfo.write("MemTotal:       24683664 kB\n")

        try:
            assert detect_memory_gb(path) == 23.5
        finally:
            os.unlink(path)

    def test_detect_resources_describes_this_machine(self, data_dir: str) -> None:
        machine = detect_resources(data_dir)

        assert machine.cpu_ids == tuple(sorted(os.sched_getaffinity(0)))
        assert machine.memory_gb > 0
        assert machine.disk_gb >= 0

    @pytest.mark.skipif(
        os.path.exists("/dev/nvidiactl"), reason="an NVIDIA driver is present"
    )
    def test_detect_gpus_without_nvml_finds_none(self) -> None:
        with capture_logs() as logs:
            gpus = detect_gpus()

        assert gpus == ()
        assert [entry["event"] for entry in logs] == ["gpu_detection_skipped"]
        assert logs[0]["log_level"] == "debug"

    def test_detect_gpus_numbers_by_pci_bus(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # NVML lists the H100 first, but the A100 sits on the lower PCI bus id.
        fake = FakeNvml(
            [
                ("NVIDIA H100 80GB HBM3", "00000000:B1:00.0", 81559 * 1024**2),
                (b"NVIDIA A100-SXM4-40GB", b"00000000:3b:00.0", 40960 * 1024**2),
            ]
        )
        monkeypatch.setitem(sys.modules, "pynvml", fake)

        gpus = detect_gpus()

        assert gpus == (Gpu("A100", 40.0, 0), Gpu("H100", 80.0, 1))
        assert fake.shut_down

    def test_detect_gpus_without_driver_logs_debug(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        fake = FakeNvml([], init_error="Driver Not Loaded")
        monkeypatch.setitem(sys.modules, "pynvml", fake)

        with capture_logs() as logs:
            gpus = detect_gpus()

        assert gpus == ()
        assert logs == [
            {
                "event": "gpu_detection_skipped",
                "log_level": "debug",
                "reason": "Driver Not Loaded",
            }
        ]

    @pytest.mark.parametrize(
        ("nvml_name", "expected"),
        [
            ("NVIDIA A100-SXM4-80GB", "A100"),
            ("NVIDIA A100-PCIE-40GB", "A100"),
            ("NVIDIA H100 80GB HBM3", "H100"),
            ("NVIDIA H100 PCIe", "H100"),
            ("NVIDIA H100 NVL", "H100"),
            ("NVIDIA H200", "H200"),
            ("Tesla T4", "T4"),
            ("Tesla V100-SXM2-16GB", "V100"),
            ("NVIDIA A10G", "A10G"),
            ("NVIDIA L40S", "L40S"),
            ("NVIDIA GeForce RTX 4090", "RTX4090"),
            ("NVIDIA RTX A6000", "A6000"),
            ("NVIDIA RTX 6000 Ada Generation", "RTX6000Ada"),
        ],
    )
    def test_short_gpu_name(self, nvml_name: str, expected: str) -> None:
        assert short_gpu_name(nvml_name) == expected


class TestInventory:
    def test_declared_inventory_replaces_detection(self, data_dir: str) -> None:
        backend = make_backend(data_dir)

        assert backend.machine == Capacity(
            cpu_ids=_declared_ids(8),
            memory_gb=64.0,
            disk_gb=500.0,
            gpus=tuple(Gpu("A100", 80.0, i) for i in range(4)),
        )

    def test_declared_cpus_take_real_ids_first(self, data_dir: str) -> None:
        real = detect_cpu_ids()
        backend = make_backend(data_dir, cpus=len(real) + 3)

        assert backend.machine.cpu_ids[: len(real)] == real
        assert len(set(backend.machine.cpu_ids)) == len(real) + 3

    def test_fewer_declared_cpus_take_real_ids(self, data_dir: str) -> None:
        real = detect_cpu_ids()
        backend = make_backend(data_dir, cpus=1)

        assert backend.machine.cpu_ids == real[:1]

    def test_declared_gpus_without_index_fill_free_indices(self, data_dir: str) -> None:
        gpus = [Gpu("T4", 16.0), Gpu("A100", 80.0, 0), Gpu("T4", 16.0)]
        backend = make_backend(data_dir, gpus=gpus)

        assert backend.machine.gpus == (
            Gpu("A100", 80.0, 0),
            Gpu("T4", 16.0, 1),
            Gpu("T4", 16.0, 2),
        )

    def test_duplicate_gpu_index_is_rejected(self, data_dir: str) -> None:
        gpus = [Gpu("A100", 80.0, 1), Gpu("A100", 80.0, 1)]

        with pytest.raises(InvalidValueError, match=r"local\.gpus \[1\]"):
            make_backend(data_dir, gpus=gpus)

    @pytest.mark.parametrize(
        ("field", "value", "message"),
        [
            ("cpus", 0, "invalid local.cpus 0"),
            ("memory_gb", -1.0, "invalid local.memory -1.0"),
            ("disk_gb", -5.0, "invalid local.disk -5.0"),
        ],
    )
    def test_nonpositive_sizes_are_rejected(
        self, data_dir: str, field: str, value: float, message: str
    ) -> None:
        with pytest.raises(InvalidValueError, match=message):
            make_backend(data_dir, **{field: value})


def _declared_ids(count: int) -> tuple[int, ...]:
    """The ids a declared CPU count gets: real ids first, then made-up ones."""
    real = detect_cpu_ids()
    if count <= len(real):
        return real[:count]

    extra = range(max(real) + 1, max(real) + 1 + count - len(real))

    return real + tuple(extra)


class TestOffers:
    @pytest.mark.parametrize(
        ("requirements", "expected"),
        [
            pytest.param(
                {},
                ["local-2c-8g", "local-4c-16g", "local-8c-32g", "local-8c-64g"],
                id="defaults-double-up-to-the-machine",
            ),
            pytest.param(
                {"cpu": "2..4", "memory": "8GB..16GB"},
                ["local-2c-8g", "local-4c-16g"],
                id="capped-by-range-max",
            ),
            pytest.param(
                {"cpu": "3", "memory": "10GB"},
                ["local-3c-10g"],
                id="exact-values",
            ),
            pytest.param(
                {"cpu": "1..", "memory": "..16GB"},
                ["local-1c-8g", "local-2c-16g", "local-4c-16g", "local-8c-16g"],
                id="memory-without-min-takes-per-cpu-share",
            ),
            pytest.param(
                {"gpu": "A100:2"},
                [
                    "local-2c-8g-2xA100",
                    "local-4c-16g-2xA100",
                    "local-8c-32g-2xA100",
                    "local-8c-64g-2xA100",
                ],
                id="gpus-stay-at-count-min",
            ),
            pytest.param({"cpu": "16.."}, [], id="more-cpus-than-declared"),
            pytest.param({"memory": "128GB.."}, [], id="more-memory-than-declared"),
            pytest.param({"gpu": "5"}, [], id="more-gpus-than-declared"),
            pytest.param({"gpu": "H100"}, [], id="gpu-name-not-present"),
            pytest.param({"gpu": "40GB"}, [], id="gpu-memory-too-small"),
            pytest.param({"disk": "600GB.."}, [], id="more-disk-than-declared"),
            pytest.param({"spot_policy": "spot"}, [], id="no-spot-here"),
            pytest.param({"backends": "aws"}, [], id="other-backend-only"),
        ],
    )
    async def test_offers_for_requirements(
        self, data_dir: str, requirements: dict[str, str], expected: list[str]
    ) -> None:
        backend = make_backend(data_dir)

        offers = await backend.list_offers(build_requirements(**requirements))

        assert [offer.instance_type for offer in offers] == expected

    async def test_offers_all_match_their_requirements(self, data_dir: str) -> None:
        backend = make_backend(data_dir, gpus=[A100, A100, T4])
        requirements = build_requirements(cpu="2..6", memory="4GB..", gpu="1")

        offers = await backend.list_offers(requirements)

        assert offers
        for offer in offers:
            assert matches(requirements, offer), offer

    async def test_offer_fields(self, data_dir: str) -> None:
        backend = make_backend(data_dir, region="lab-1")

        offer = await first_offer(
            backend, cpu="4", memory="16GB", gpu="A100", disk="100GB"
        )

        assert offer == Offer(
            backend="local",
            region="lab-1",
            instance_type="local-4c-16g-1xA100",
            resources=Resources(cpus=4, memory_gb=16.0, gpus=(A100,), disk_gb=100.0),
            spot=False,
            price=0.0,
        )

    async def test_gpu_models_are_offered_separately(self, data_dir: str) -> None:
        backend = make_backend(data_dir, gpus=[A100, T4])

        requirements = build_requirements(cpu="2", memory="8GB", gpu="1")

        offers = await backend.list_offers(requirements)

        assert [offer.instance_type for offer in offers] == [
            "local-2c-8g-1xT4",
            "local-2c-8g-1xA100",
        ]

    @pytest.mark.parametrize(
        ("requirements", "price"),
        [
            pytest.param({"cpu": "2", "memory": "8GB"}, 2.0, id="cpu-share"),
            pytest.param({"cpu": "2", "memory": "32GB"}, 4.0, id="memory-share"),
            pytest.param(
                {"cpu": "2", "memory": "8GB", "gpu": "2"}, 4.0, id="gpu-share"
            ),
        ],
    )
    async def test_price_scales_with_largest_share(
        self, data_dir: str, requirements: dict[str, str], price: float
    ) -> None:
        backend = make_backend(data_dir, price_per_hour=8.0)

        offer = await first_offer(backend, **requirements)

        assert offer.price == price

    async def test_offers_are_cheapest_first(self, data_dir: str) -> None:
        backend = make_backend(data_dir, price_per_hour=8.0)

        offers = await backend.list_offers(Requirements())
        prices = [offer.price for offer in offers]

        assert prices == sorted(prices)

    async def test_max_price_drops_larger_slices(self, data_dir: str) -> None:
        backend = make_backend(data_dir, price_per_hour=8.0)

        offers = await backend.list_offers(build_requirements(max_price="4"))

        assert [offer.instance_type for offer in offers] == [
            "local-2c-8g",
            "local-4c-16g",
        ]

    async def test_offers_shrink_to_free_capacity(self, data_dir: str) -> None:
        backend = make_backend(data_dir)
        await backend.create("i-1", await first_offer(backend, cpu="6", memory="48GB"))

        offers = await backend.list_offers(Requirements())

        assert [offer.instance_type for offer in offers] == [
            "local-2c-8g",
            "local-2c-16g",
        ]


class TestReservations:
    async def test_create_reserves_lowest_free_ids(self, data_dir: str) -> None:
        backend = make_backend(data_dir)
        offer = await first_offer(
            backend, cpu="2", memory="16GB", gpu="2", disk="10GB"
        )

        provisioned = await backend.create("i-1", offer)

        assert provisioned.backend_data == {
            "cpu_ids": _ids_text(backend.machine.cpu_ids[:2]),
            "gpu_indices": "0,1",
            "memory_gb": "16",
            "disk_gb": "10",
        }
        assert provisioned.resources == Resources(
            cpus=2,
            memory_gb=16.0,
            gpus=(Gpu("A100", 80.0, 0), Gpu("A100", 80.0, 1)),
            disk_gb=10.0,
        )
        assert provisioned.hostname

    async def test_reservations_never_overlap(self, data_dir: str) -> None:
        backend = make_backend(data_dir)
        requested = {"cpu": "2", "memory": "12GB", "gpu": "1", "disk": "100GB"}
        reservations = []
        for number in range(4):
            offer = await first_offer(backend, **requested)
            provisioned = await backend.create(f"i-{number}", offer)
            reservations.append(Reservation.from_backend_data(provisioned.backend_data))

        cpu_ids = [i for r in reservations for i in r.cpu_ids]
        gpu_indices = [i for r in reservations for i in r.gpu_indices]
        assert len(cpu_ids) == len(set(cpu_ids)) == 8
        assert sorted(gpu_indices) == [0, 1, 2, 3]
        assert sum(r.memory_gb for r in reservations) == 48.0
        assert await backend.list_offers(build_requirements(**requested)) == []

    async def test_create_rejects_offer_that_no_longer_fits(
        self, data_dir: str
    ) -> None:
        backend = make_backend(data_dir)
        offer = await first_offer(backend, cpu="6", memory="8GB")
        await backend.create("i-1", offer)

        with pytest.raises(BackendError, match=r"i-2: 6 CPUs requested .* 2 CPUs"):
            await backend.create("i-2", offer)

    async def test_create_rejects_gpu_model_not_free(self, data_dir: str) -> None:
        backend = make_backend(data_dir, gpus=[A100, T4])
        offer = await first_offer(backend, gpu="A100")
        await backend.create("i-1", offer)

        with pytest.raises(BackendError, match=r"1xA100 \(80GB\) requested"):
            await backend.create("i-2", offer)

    async def test_create_rejects_offer_of_other_backend(self, data_dir: str) -> None:
        backend = make_backend(data_dir)
        offer = Offer(
            backend="aws",
            region="us-east-1",
            instance_type="m5.large",
            resources=Resources(cpus=2, memory_gb=8.0),
        )

        with pytest.raises(BackendError, match="offer of backend 'aws'"):
            await backend.create("i-1", offer)

    async def test_create_is_idempotent_per_instance_id(self, data_dir: str) -> None:
        backend = make_backend(data_dir)
        offer = await first_offer(backend, cpu="2", memory="8GB")

        first = await backend.create("i-1", offer)
        second = await backend.create("i-1", offer)

        assert second == first
        assert len(backend.free_capacity().cpu_ids) == 6

    async def test_terminate_frees_and_is_idempotent(self, data_dir: str) -> None:
        backend = make_backend(data_dir)
        provisioned = await backend.create("i-1", await first_offer(backend, gpu="2"))

        await backend.terminate("i-1", provisioned.backend_data)
        await backend.terminate("i-1", provisioned.backend_data)

        assert backend.free_capacity() == backend.machine

    async def test_restore_reserves_recorded_instances(self, data_dir: str) -> None:
        backend = make_backend(data_dir)
        offer = await first_offer(backend, gpu="1")
        recorded = Reservation(cpu_ids=(2, 3), memory_gb=8.0, gpu_indices=(3,))
        live = LiveInstance("i-1", offer, offer.resources, recorded.to_backend_data())

        backend.restore([live])
        free = backend.free_capacity()

        assert 2 not in free.cpu_ids
        assert 3 not in free.cpu_ids
        assert [gpu.index for gpu in free.gpus] == [0, 1, 2]
        assert free.memory_gb == 56.0

    async def test_restore_skips_overlapping_instance(self, data_dir: str) -> None:
        backend = make_backend(data_dir)
        offer = await first_offer(backend, gpu="1")
        first = Reservation(cpu_ids=(0, 1), memory_gb=8.0, gpu_indices=(0,))
        overlapping = Reservation(cpu_ids=(1, 2), memory_gb=8.0, gpu_indices=(1,))
        live = [
            LiveInstance("i-1", offer, offer.resources, first.to_backend_data()),
            LiveInstance("i-2", offer, offer.resources, overlapping.to_backend_data()),
        ]

        with capture_logs() as logs:
            backend.restore(live)

        assert backend.free_capacity().memory_gb == 56.0
        assert [entry["event"] for entry in logs] == ["local_instance_restore_failed"]
        assert logs[0]["instance_id"] == "i-2"
        assert logs[0]["error"] == "reservation overlaps instance i-1"

    async def test_restore_ignores_other_backends(self, data_dir: str) -> None:
        backend = make_backend(data_dir)
        offer = Offer(
            backend="aws",
            region="us-east-1",
            instance_type="m5.large",
            resources=Resources(cpus=2, memory_gb=8.0),
        )

        backend.restore([LiveInstance("i-1", offer, offer.resources, {"id": "x"})])

        assert backend.free_capacity() == backend.machine

    async def test_restored_instance_can_be_terminated(self, data_dir: str) -> None:
        backend = make_backend(data_dir)
        offer = await first_offer(backend)
        provisioned = await backend.create("i-1", offer)
        restarted = make_backend(data_dir)
        live = LiveInstance(
            "i-1", offer, provisioned.resources, provisioned.backend_data
        )

        restarted.restore([live])
        await restarted.terminate("i-1", provisioned.backend_data)

        assert restarted.free_capacity() == restarted.machine


class TestReservationEncoding:
    def test_backend_data_round_trip(self) -> None:
        reservation = Reservation(
            cpu_ids=(4, 5), memory_gb=11.5, gpu_indices=(1,), disk_gb=20.0
        )

        data = reservation.to_backend_data()

        assert data == {
            "cpu_ids": "4,5",
            "gpu_indices": "1",
            "memory_gb": "11.5",
            "disk_gb": "20",
        }
        assert Reservation.from_backend_data(data) == reservation

    @pytest.mark.parametrize(
        "data",
        [
            pytest.param({"memory_gb": "8"}, id="no-cpu-ids"),
            pytest.param({"cpu_ids": "0", "memory_gb": "eight"}, id="bad-memory"),
            pytest.param({"cpu_ids": "0,x", "memory_gb": "8"}, id="bad-cpu-id"),
        ],
    )
    def test_malformed_backend_data_is_rejected(self, data: dict[str, str]) -> None:
        with pytest.raises(BackendError, match="invalid local backend_data"):
            Reservation.from_backend_data(data)


def _ids_text(ids: tuple[int, ...]) -> str:
    return ",".join(str(i) for i in ids)
