"""Tests of offer matching: one case per requirement that can fail, with its
reason text, and the cases that must match."""

from typing import Any

import msgspec
import pytest

from events.grammar import build_requirements
from events.matching import describe_requirements, format_range, matches, mismatch
from events.model import Gpu, GpuSpec, Offer, Range, Requirements, Resources

A100 = Gpu(name="A100", memory_gb=80.0)

# Fits the default requirements and every requirement in MATCHING below.
BASE_OFFER = Offer(
    backend="local",
    region="local",
    instance_type="local-8cpu",
    resources=Resources(cpus=8, memory_gb=32.0, gpus=(A100, A100), disk_gb=200.0),
    spot=False,
    price=1.0,
)


def make_offer(resources: dict[str, Any] | None = None, **fields: Any) -> Offer:
    """Return ``BASE_OFFER`` with some offer and resource fields replaced."""
    new_resources = msgspec.structs.replace(BASE_OFFER.resources, **(resources or {}))

    return msgspec.structs.replace(BASE_OFFER, resources=new_resources, **fields)


MISMATCHING = [
    pytest.param({"cpu": "16.."}, make_offer(), "cpu 8 is outside 16..", id="cpu-min"),
    pytest.param({"cpu": "..4"}, make_offer(), "cpu 8 is outside ..4", id="cpu-max"),
    pytest.param({"cpu": "4"}, make_offer(), "cpu 8 is outside 4", id="cpu-exact"),
    pytest.param(
        {},
        make_offer({"cpus": 1}),
        "cpu 1 is outside 2..",
        id="cpu-default",
    ),
    pytest.param(
        {"memory": "64GB.."},
        make_offer(),
        "memory 32GB is outside 64GB..",
        id="memory-min",
    ),
    pytest.param(
        {"memory": "..16GB"},
        make_offer(),
        "memory 32GB is outside ..16GB",
        id="memory-max",
    ),
    pytest.param(
        {},
        make_offer({"memory_gb": 0.5}),
        "memory 512MB is outside 8GB..",
        id="memory-default",
    ),
    pytest.param(
        {"memory": "1TB.."},
        make_offer(),
        "memory 32GB is outside 1TB..",
        id="memory-in-tb",
    ),
    pytest.param(
        {"gpu": "H100,T4"},
        make_offer(),
        "gpu name A100 is not one of H100, T4",
        id="gpu-name",
    ),
    pytest.param(
        {"gpu": "A100:2"},
        make_offer({"gpus": (A100, Gpu(name="T4", memory_gb=16.0))}),
        "gpu name T4 is not one of A100",
        id="gpu-name-of-second-gpu",
    ),
    pytest.param(
        {"gpu": "A100:4"},
        make_offer(),
        "gpu count 2 is outside 4",
        id="gpu-count",
    ),
    pytest.param(
        {"gpu": "3.."},
        make_offer(),
        "gpu count 2 is outside 3..",
        id="gpu-count-min",
    ),
    pytest.param(
        {"gpu": "A100"},
        make_offer({"gpus": ()}),
        "gpu count 0 is outside 1",
        id="gpu-missing",
    ),
    pytest.param(
        {"gpu": "A100"},
        make_offer(),
        "gpu count 2 is outside 1",
        id="gpu-count-defaults-to-one",
    ),
    pytest.param(
        {"gpu": "0"},
        make_offer(),
        "gpu count 2 is outside 0",
        id="gpu-count-zero",
    ),
    pytest.param(
        {"gpu": "40GB..:2"},
        make_offer({"gpus": (A100, Gpu(name="A100", memory_gb=16.0))}),
        "gpu memory 16GB is outside 40GB..",
        id="gpu-memory-min",
    ),
    pytest.param(
        {"gpu": "A100:..40GB:2"},
        make_offer(),
        "gpu memory 80GB is outside ..40GB",
        id="gpu-memory-max",
    ),
    pytest.param(
        {"disk": "500GB.."},
        make_offer(),
        "disk 200GB is outside 500GB..",
        id="disk-min",
    ),
    pytest.param(
        {"disk": "100GB"},
        make_offer({"disk_gb": 0.0}),
        "disk 0GB is outside 100GB",
        id="disk-not-reported",
    ),
    pytest.param(
        {"max_price": "0.5"},
        make_offer(price=1.2),
        "price 1.20 is above max price 0.50",
        id="price",
    ),
    pytest.param(
        {"max_price": "0.001"},
        make_offer(price=0.0035),
        "price 0.0035 is above max price 0.001",
        id="price-below-a-cent",
    ),
    pytest.param(
        {},
        make_offer(spot=True),
        "spot offer but spot policy is on-demand",
        id="spot-offer-on-demand-policy",
    ),
    pytest.param(
        {"spot_policy": "spot"},
        make_offer(),
        "on-demand offer but spot policy is spot",
        id="on-demand-offer-spot-policy",
    ),
    pytest.param(
        {"backends": "aws"},
        make_offer(),
        "backend local is not one of aws",
        id="backend",
    ),
    pytest.param(
        {"backends": "aws,ssh"},
        make_offer(),
        "backend local is not one of aws, ssh",
        id="backend-list",
    ),
]


@pytest.mark.parametrize(("fields", "offer", "reason"), MISMATCHING)
def test_mismatch_names_failed_requirement(
    fields: dict[str, str], offer: Offer, reason: str
) -> None:
    requirements = build_requirements(**fields)

    assert mismatch(requirements, offer) == reason


@pytest.mark.parametrize(("fields", "offer", "reason"), MISMATCHING)
def test_matches_is_false_on_mismatch(
    fields: dict[str, str], offer: Offer, reason: str
) -> None:
    requirements = build_requirements(**fields)

    assert not matches(requirements, offer)


MATCHING = [
    pytest.param({}, make_offer(), id="defaults"),
    pytest.param({"cpu": "8"}, make_offer(), id="cpu-exact"),
    pytest.param({"cpu": "2..8"}, make_offer(), id="cpu-at-upper-bound"),
    pytest.param({"memory": "32GB"}, make_offer(), id="memory-exact"),
    pytest.param({"memory": "32768MB"}, make_offer(), id="memory-in-mb"),
    pytest.param({"memory": "..1TB"}, make_offer(), id="memory-in-tb"),
    pytest.param({"gpu": "A100:2"}, make_offer(), id="gpu-name-and-count"),
    pytest.param({"gpu": "a100:2"}, make_offer(), id="gpu-name-lower-case"),
    pytest.param(
        {"gpu": "A100:2"},
        make_offer({"gpus": (Gpu("a100", 80.0), Gpu("a100", 80.0))}),
        id="offer-gpu-name-lower-case",
    ),
    pytest.param({"gpu": "H100,A100:1..4"}, make_offer(), id="gpu-name-list"),
    pytest.param({"gpu": "80GB:2"}, make_offer(), id="gpu-memory-exact"),
    pytest.param({"gpu": "24GB..:2.."}, make_offer(), id="gpu-memory-and-count-min"),
    pytest.param({"gpu": "0"}, make_offer({"gpus": ()}), id="gpu-count-zero"),
    pytest.param({}, make_offer(), id="no-gpu-requirement-accepts-gpus"),
    pytest.param({"disk": "100GB.."}, make_offer(), id="disk-min"),
    pytest.param({"max_price": "1"}, make_offer(), id="price-equal-to-max"),
    pytest.param(
        {"spot_policy": "auto"}, make_offer(spot=True), id="auto-accepts-spot"
    ),
    pytest.param({"spot_policy": "auto"}, make_offer(), id="auto-accepts-on-demand"),
    pytest.param({"spot_policy": "spot"}, make_offer(spot=True), id="spot"),
    pytest.param({"backends": "local,aws"}, make_offer(), id="backend-in-list"),
    pytest.param({"backends": "LOCAL"}, make_offer(), id="backend-upper-case"),
]


@pytest.mark.parametrize(("fields", "offer"), MATCHING)
def test_mismatch_is_none_when_offer_fits(fields: dict[str, str], offer: Offer) -> None:
    requirements = build_requirements(**fields)

    assert mismatch(requirements, offer) is None


@pytest.mark.parametrize(("fields", "offer"), MATCHING)
def test_matches_is_true_when_offer_fits(fields: dict[str, str], offer: Offer) -> None:
    requirements = build_requirements(**fields)

    assert matches(requirements, offer)


def test_mismatch_reports_first_failed_requirement() -> None:
    requirements = build_requirements(cpu="16..", memory="64GB..", max_price="0.5")

    reason = mismatch(requirements, make_offer(price=2.0))

    assert reason == "cpu 8 is outside 16.."


def test_mismatch_checks_backend_before_resources() -> None:
    requirements = build_requirements(cpu="16..", backends="aws")

    reason = mismatch(requirements, make_offer())

    assert reason == "backend local is not one of aws"


def test_mismatch_checks_gpu_name_before_count() -> None:
    requirements = build_requirements(gpu="H100:4")

    reason = mismatch(requirements, make_offer())

    assert reason == "gpu name A100 is not one of H100"


def test_mismatch_reports_empty_backend_list() -> None:
    requirements = Requirements(backends=())

    reason = mismatch(requirements, make_offer())

    assert reason == "backend local is not one of (none)"


DESCRIBED = [
    pytest.param(Requirements(), "2..xCPU, 8GB..", id="defaults"),
    pytest.param(
        Requirements(cpu=Range(4, 8), memory=Range(16.0, 16.0)),
        "4..8xCPU, 16GB",
        id="exact-memory",
    ),
    pytest.param(
        Requirements(gpu=GpuSpec(names=("A100",))),
        "2..xCPU, 8GB.., 1xA100",
        id="gpu-name",
    ),
    pytest.param(
        Requirements(
            cpu=Range(4, None),
            memory=Range(16.0, None),
            gpu=GpuSpec(
                names=("A100", "H100"), memory=Range(40.0, None), count=Range(1, 2)
            ),
            disk=Range(200.0, None),
        ),
        "4..xCPU, 16GB.., 1..2xA100,H100 (40GB..), 200GB.. (disk)",
        id="every-resource",
    ),
    pytest.param(
        Requirements(gpu=GpuSpec(count=Range(2, None))),
        "2..xCPU, 8GB.., 2..xGPU",
        id="gpu-without-name",
    ),
    pytest.param(
        Requirements(disk=Range(None, 1024.0)),
        "2..xCPU, 8GB.., ..1TB (disk)",
        id="disk-in-tb",
    ),
]


@pytest.mark.parametrize(("requirements", "expected"), DESCRIBED)
def test_describe_requirements_prints_resources(
    requirements: Requirements, expected: str
) -> None:
    assert describe_requirements(requirements) == expected


def test_format_range_is_exported_for_messages() -> None:
    assert format_range(Range(8.0, None), "size") == "8GB.."
