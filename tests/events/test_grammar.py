"""Tests of the text grammars: every accepted form, every rejected form, and the
format functions that print values back in a form the parsers accept."""

import re

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from events.errors import InvalidValueError
from events.grammar import (
    BACKENDS_FORMS,
    COUNT_RANGE_FORMS,
    DURATION_FORMS,
    GPU_FORMS,
    MAX_DURATION_SECONDS,
    PRICE_FORMS,
    SIZE_FORMS,
    SIZE_RANGE_FORMS,
    SPOT_POLICY_FORMS,
    RangeUnit,
    build_requirements,
    format_duration,
    format_gpu,
    format_range,
    format_size,
    parse_backends,
    parse_duration,
    parse_gpu,
    parse_price,
    parse_range,
    parse_size,
    parse_spot_policy,
)
from events.model import Duration, GpuSpec, Range, Requirements


def expected_message(field: str, value: str, forms: str) -> str:
    """Return a pattern for the start of an ``InvalidValueError`` message."""
    return re.escape(f"invalid {field} {value!r}: expected {forms}")


# Durations

DURATION_ACCEPTED = [
    pytest.param("300", 300, id="bare-seconds"),
    pytest.param("0", 0, id="zero"),
    pytest.param("00", 0, id="zero-with-leading-zero"),
    pytest.param("off", "off", id="off"),
    pytest.param("45s", 45, id="seconds"),
    pytest.param("5m", 300, id="minutes"),
    pytest.param("72h", 259200, id="hours"),
    pytest.param("2d", 172800, id="days"),
    pytest.param("1w", 604800, id="weeks"),
    pytest.param("0m", 0, id="zero-with-unit"),
    pytest.param("5 m", 300, id="space-before-unit"),
    pytest.param("1h30m", 5400, id="compound"),
    pytest.param("1h 30m", 5400, id="compound-with-space"),
    pytest.param("1w2d3h4m5s", 788645, id="compound-all-units"),
    pytest.param(" 5m ", 300, id="surrounding-space"),
    pytest.param("3153600000", MAX_DURATION_SECONDS, id="maximum"),
]

DURATION_REJECTED = [
    pytest.param("5x", None, id="unknown-unit"),
    pytest.param("", None, id="empty"),
    pytest.param("   ", None, id="blank"),
    pytest.param("-5", None, id="negative-seconds"),
    pytest.param("-5m", None, id="negative-with-unit"),
    pytest.param("1.5h", None, id="fraction"),
    pytest.param("m", None, id="unit-without-number"),
    pytest.param("1h30", None, id="compound-with-bare-seconds"),
    pytest.param("Off", None, id="off-capitalised"),
    pytest.param("never", None, id="word"),
    pytest.param("5 minutes", None, id="unit-spelled-out"),
    pytest.param("5M", "units are lower case (5m)", id="upper-case-unit"),
    pytest.param("1H30m", "units are lower case (1h)", id="upper-case-in-compound"),
    pytest.param(
        "30m1h",
        "units must go from largest to smallest, each at most once",
        id="units-out-of-order",
    ),
    pytest.param(
        "1h1h",
        "units must go from largest to smallest, each at most once",
        id="unit-repeated",
    ),
    pytest.param(
        "3153600001",
        "durations are limited to 3153600000 seconds (100 years)",
        id="above-maximum",
    ),
    pytest.param(
        "5300w",
        "durations are limited to 3153600000 seconds (100 years)",
        id="above-maximum-in-weeks",
    ),
    pytest.param("1" * 19, None, id="too-many-digits"),
]


@pytest.mark.parametrize(("text", "expected"), DURATION_ACCEPTED)
def test_parse_duration_accepts_form(text: str, expected: Duration) -> None:
    assert parse_duration(text) == expected


def test_parse_duration_returns_int_for_zero() -> None:
    value = parse_duration("0")

    assert type(value) is int


@pytest.mark.parametrize(("text", "problem"), DURATION_REJECTED)
def test_parse_duration_rejects_form(text: str, problem: str | None) -> None:
    with pytest.raises(
        InvalidValueError, match=expected_message("idle duration", text, DURATION_FORMS)
    ) as caught:
        parse_duration(text, "idle duration")

    if problem is not None:
        assert problem in str(caught.value)


def test_parse_duration_message_lists_accepted_forms() -> None:
    with pytest.raises(InvalidValueError) as caught:
        parse_duration("5x", "idle duration")

    assert str(caught.value) == (
        "invalid idle duration '5x': expected seconds (300), a number with a unit "
        "s, m, h, d or w (5m, 1h30m), 'off' or '0'"
    )
    assert caught.value.field == "idle duration"
    assert caught.value.value == "5x"


def test_parse_duration_uses_default_field_name() -> None:
    with pytest.raises(InvalidValueError, match="^invalid duration '5x'"):
        parse_duration("5x")


FORMATTED_DURATIONS = [
    pytest.param(None, "-", id="not-set"),
    pytest.param("off", "off", id="off"),
    pytest.param(0, "0s", id="zero"),
    pytest.param(45, "45s", id="seconds"),
    pytest.param(300, "5m", id="minutes"),
    pytest.param(5400, "1h30m", id="hours-and-minutes"),
    pytest.param(259200, "72h", id="days-as-hours"),
    pytest.param(3661, "1h1m1s", id="all-units"),
    pytest.param(7201, "2h1s", id="gap-in-units"),
]


@pytest.mark.parametrize(("value", "expected"), FORMATTED_DURATIONS)
def test_format_duration_prints_form(value: Duration | None, expected: str) -> None:
    assert format_duration(value) == expected


@pytest.mark.parametrize(
    "value", [pytest.param(v, id=str(v)) for v in (0, 1, 59, 60, 3600, 90061, "off")]
)
def test_format_duration_round_trips_through_parse(value: Duration) -> None:
    assert parse_duration(format_duration(value)) == value


def test_format_duration_rejects_negative_seconds() -> None:
    with pytest.raises(ValueError, match="negative duration -1"):
        format_duration(-1)


@given(st.integers(min_value=0, max_value=MAX_DURATION_SECONDS) | st.just("off"))
def test_duration_round_trip_property(value: Duration) -> None:
    assert parse_duration(format_duration(value)) == value


class IdleSettings(msgspec.Struct, frozen=True):
    idle_duration: Duration | None = None


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="not-set"),
        pytest.param(0, id="zero"),
        pytest.param("off", id="off"),
        pytest.param(300, id="minutes"),
    ],
)
def test_duration_survives_msgspec_json(value: Duration | None) -> None:
    encoded = msgspec.json.encode(IdleSettings(value))

    decoded = msgspec.json.decode(encoded, type=IdleSettings)

    assert decoded.idle_duration == value
    assert type(decoded.idle_duration) is type(value)


def test_off_zero_and_unset_stay_distinct() -> None:
    values: list[Duration | None] = [None, 0, "off"]

    decoded = [
        msgspec.json.decode(msgspec.json.encode(IdleSettings(v)), type=IdleSettings)
        for v in values
    ]

    assert len({msgspec.json.encode(d) for d in decoded}) == 3
    assert [d.idle_duration for d in decoded] == [None, 0, "off"]
    assert [format_duration(d.idle_duration) for d in decoded] == ["-", "0s", "off"]


# Sizes

SIZE_ACCEPTED = [
    pytest.param("16", 16.0, id="bare-number-is-gb"),
    pytest.param("0", 0.0, id="zero"),
    pytest.param("80GB", 80.0, id="gb"),
    pytest.param("80gb", 80.0, id="gb-lower-case"),
    pytest.param("80Gb", 80.0, id="gb-mixed-case"),
    pytest.param("80 GB", 80.0, id="space-before-unit"),
    pytest.param("512MB", 0.5, id="mb"),
    pytest.param("100MB", 100 / 1024, id="mb-not-power-of-two"),
    pytest.param("2TB", 2048.0, id="tb"),
    pytest.param("1.5TB", 1536.0, id="decimal-tb"),
    pytest.param("0.5", 0.5, id="decimal-gb"),
    pytest.param(" 8GB ", 8.0, id="surrounding-space"),
]

SIZE_REJECTED = [
    pytest.param("", id="empty"),
    pytest.param("-8GB", id="negative"),
    pytest.param("8KB", id="unknown-unit-kb"),
    pytest.param("8GiB", id="unknown-unit-gib"),
    pytest.param("8G", id="unit-abbreviated"),
    pytest.param("GB", id="unit-without-number"),
    pytest.param(".5GB", id="no-leading-digit"),
    pytest.param("8.GB", id="no-digit-after-point"),
    pytest.param("1e3GB", id="exponent"),
    pytest.param("inf", id="infinity"),
    pytest.param("nan", id="not-a-number"),
    pytest.param("9" * 400, id="overflows-float"),
    pytest.param("8GB..", id="range"),
]


@pytest.mark.parametrize(("text", "expected"), SIZE_ACCEPTED)
def test_parse_size_accepts_form(text: str, expected: float) -> None:
    assert parse_size(text, "memory") == expected


@pytest.mark.parametrize("text", SIZE_REJECTED)
def test_parse_size_rejects_form(text: str) -> None:
    with pytest.raises(
        InvalidValueError, match=expected_message("memory", text, SIZE_FORMS)
    ):
        parse_size(text, "memory")


FORMATTED_SIZES = [
    pytest.param(0.0, "0GB", id="zero"),
    pytest.param(0.5, "512MB", id="below-one-gb-as-mb"),
    pytest.param(16.0, "16GB", id="whole-gb"),
    pytest.param(15.5, "15.5GB", id="fraction-of-gb"),
    pytest.param(1024.0, "1TB", id="one-tb"),
    pytest.param(1536.0, "1536GB", id="fraction-of-tb-as-gb"),
    pytest.param(4096.0, "4TB", id="whole-tb"),
]


@pytest.mark.parametrize(("gb", "expected"), FORMATTED_SIZES)
def test_format_size_prints_form(gb: float, expected: str) -> None:
    assert format_size(gb) == expected


@pytest.mark.parametrize(("gb", "text"), FORMATTED_SIZES)
def test_format_size_round_trips_through_parse(gb: float, text: str) -> None:
    assert parse_size(format_size(gb)) == gb


# Ranges

COUNT_RANGE_ACCEPTED = [
    pytest.param("2", Range(2, 2), id="exact"),
    pytest.param("0", Range(0, 0), id="zero"),
    pytest.param("2..", Range(2, None), id="at-least"),
    pytest.param("..4", Range(None, 4), id="at-most"),
    pytest.param("1..4", Range(1, 4), id="between"),
    pytest.param("3..3", Range(3, 3), id="equal-bounds"),
    pytest.param("1 .. 4", Range(1, 4), id="spaces-around-dots"),
]

COUNT_RANGE_REJECTED = [
    pytest.param("", None, id="empty"),
    pytest.param("..", None, id="no-bounds"),
    pytest.param("1...3", None, id="three-dots"),
    pytest.param("1..2..3", None, id="two-separators"),
    pytest.param("-1", None, id="negative"),
    pytest.param("-1..2", None, id="negative-lower-bound"),
    pytest.param("1.5", None, id="fraction"),
    pytest.param("2GB", None, id="size"),
    pytest.param("two", None, id="word"),
    pytest.param("1" * 19, None, id="too-many-digits"),
    pytest.param("4..2", "the lower bound is above the upper bound", id="reversed"),
]

SIZE_RANGE_ACCEPTED = [
    pytest.param("8GB", Range(8.0, 8.0), id="exact"),
    pytest.param("8GB..", Range(8.0, None), id="at-least"),
    pytest.param("..1TB", Range(None, 1024.0), id="at-most"),
    pytest.param("512MB..2GB", Range(0.5, 2.0), id="mixed-units"),
    pytest.param("8..16", Range(8.0, 16.0), id="bare-numbers-are-gb"),
    pytest.param("1.5GB..2.5GB", Range(1.5, 2.5), id="decimals"),
    pytest.param("8gb..", Range(8.0, None), id="lower-case-unit"),
]

SIZE_RANGE_REJECTED = [
    pytest.param("", None, id="empty"),
    pytest.param("..", None, id="no-bounds"),
    pytest.param("8GB...16GB", None, id="three-dots"),
    pytest.param("-8GB..", None, id="negative"),
    pytest.param("8XB..", None, id="unknown-unit"),
    pytest.param(
        "1TB..512GB", "the lower bound is above the upper bound", id="reversed"
    ),
]


@pytest.mark.parametrize(("text", "expected"), COUNT_RANGE_ACCEPTED)
def test_parse_count_range_accepts_form(text: str, expected: Range) -> None:
    assert parse_range(text, "cpu", unit="count") == expected


@pytest.mark.parametrize(("text", "problem"), COUNT_RANGE_REJECTED)
def test_parse_count_range_rejects_form(text: str, problem: str | None) -> None:
    with pytest.raises(
        InvalidValueError, match=expected_message("cpu", text, COUNT_RANGE_FORMS)
    ) as caught:
        parse_range(text, "cpu", unit="count")

    if problem is not None:
        assert problem in str(caught.value)


@pytest.mark.parametrize(("text", "expected"), SIZE_RANGE_ACCEPTED)
def test_parse_size_range_accepts_form(text: str, expected: Range) -> None:
    assert parse_range(text, "memory", unit="size") == expected


@pytest.mark.parametrize(("text", "problem"), SIZE_RANGE_REJECTED)
def test_parse_size_range_rejects_form(text: str, problem: str | None) -> None:
    with pytest.raises(
        InvalidValueError, match=expected_message("memory", text, SIZE_RANGE_FORMS)
    ) as caught:
        parse_range(text, "memory", unit="size")

    if problem is not None:
        assert problem in str(caught.value)


FORMATTED_RANGES = [
    pytest.param(Range(2, 2), "count", "2", id="count-exact"),
    pytest.param(Range(2, None), "count", "2..", id="count-at-least"),
    pytest.param(Range(None, 4), "count", "..4", id="count-at-most"),
    pytest.param(Range(2, 4), "count", "2..4", id="count-between"),
    pytest.param(Range(2.0, 4.0), "count", "2..4", id="count-decoded-as-float"),
    pytest.param(Range(None, None), "count", "0..", id="count-unbounded"),
    pytest.param(Range(8.0, None), "size", "8GB..", id="size-at-least"),
    pytest.param(Range(None, 1024.0), "size", "..1TB", id="size-at-most"),
    pytest.param(Range(0.5, 2.0), "size", "512MB..2GB", id="size-mixed-units"),
    pytest.param(Range(80.0, 80.0), "size", "80GB", id="size-exact"),
    pytest.param(Range(None, None), "size", "0GB..", id="size-unbounded"),
]


@pytest.mark.parametrize(("bounds", "unit", "expected"), FORMATTED_RANGES)
def test_format_range_prints_form(
    bounds: Range, unit: RangeUnit, expected: str
) -> None:
    assert format_range(bounds, unit) == expected


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        pytest.param(text, "count", id=f"count-{text}")
        for text in ("2", "2..", "..4", "1..4")
    ]
    + [
        pytest.param(text, "size", id=f"size-{text}")
        for text in ("8GB", "8GB..", "..1TB", "512MB..2GB", "1536GB..")
    ],
)
def test_format_range_round_trips_through_parse(text: str, unit: RangeUnit) -> None:
    assert format_range(parse_range(text, unit=unit), unit) == text


@given(
    st.integers(min_value=0, max_value=10**6) | st.none(),
    st.integers(min_value=0, max_value=10**6) | st.none(),
    st.sampled_from(["count", "size"]),
)
def test_range_round_trip_property(
    low: int | None, high: int | None, unit: RangeUnit
) -> None:
    if low is not None and high is not None and low > high:
        low, high = high, low

    if low is None and high is None:
        low = 0

    bounds = Range(low, high)

    assert parse_range(format_range(bounds, unit), unit=unit) == bounds


# GPUs

GPU_ACCEPTED = [
    pytest.param("A100", GpuSpec(names=("A100",)), id="name"),
    pytest.param("a100", GpuSpec(names=("A100",)), id="name-lower-case"),
    pytest.param(
        "a100:2", GpuSpec(names=("A100",), count=Range(2, 2)), id="name-and-count"
    ),
    pytest.param(
        "2:A100", GpuSpec(names=("A100",), count=Range(2, 2)), id="count-first"
    ),
    pytest.param(
        "A100:80GB:2",
        GpuSpec(names=("A100",), memory=Range(80.0, 80.0), count=Range(2, 2)),
        id="name-memory-count",
    ),
    pytest.param(
        "80GB:2:A100",
        GpuSpec(names=("A100",), memory=Range(80.0, 80.0), count=Range(2, 2)),
        id="memory-count-name",
    ),
    pytest.param(
        "24GB..:1..4",
        GpuSpec(memory=Range(24.0, None), count=Range(1, 4)),
        id="memory-range-and-count-range",
    ),
    pytest.param(
        "24GB..80GB",
        GpuSpec(memory=Range(24.0, 80.0)),
        id="memory-range-only",
    ),
    pytest.param(
        "24..80GB",
        GpuSpec(memory=Range(24.0, 80.0)),
        id="memory-range-with-one-unit",
    ),
    pytest.param(
        "H100,A100:8",
        GpuSpec(names=("H100", "A100"), count=Range(8, 8)),
        id="name-list",
    ),
    pytest.param(
        "h100, a100",
        GpuSpec(names=("H100", "A100")),
        id="name-list-with-space",
    ),
    pytest.param("A100,a100", GpuSpec(names=("A100",)), id="duplicate-name-dropped"),
    pytest.param("2", GpuSpec(count=Range(2, 2)), id="bare-count"),
    pytest.param("0", GpuSpec(count=Range(0, 0)), id="zero-count"),
    pytest.param("2..", GpuSpec(count=Range(2, None)), id="count-at-least"),
    pytest.param(
        "RTX4090:24GB",
        GpuSpec(names=("RTX4090",), memory=Range(24.0, 24.0)),
        id="name-with-digits",
    ),
    pytest.param(
        "A100-80GB", GpuSpec(names=("A100-80GB",)), id="name-containing-a-size"
    ),
    pytest.param(
        " A100 : 2 ", GpuSpec(names=("A100",), count=Range(2, 2)), id="spaces"
    ),
]

GPU_REJECTED = [
    pytest.param("", None, id="empty"),
    pytest.param("A100::2", "a part is empty", id="empty-part"),
    pytest.param(":A100", "a part is empty", id="leading-colon"),
    pytest.param("A100:", "a part is empty", id="trailing-colon"),
    pytest.param("A100:H100", "names are given twice", id="two-name-lists"),
    pytest.param("2:4", "the count is given twice", id="two-counts"),
    pytest.param("80GB:40GB", "memory is given twice", id="two-memories"),
    pytest.param(
        "A100:4..2",
        "the count '4..2' has its lower bound above the upper bound",
        id="reversed-count",
    ),
    pytest.param(
        "80GB..24GB",
        "the memory '80GB..24GB' has its lower bound above the upper bound",
        id="reversed-memory",
    ),
    pytest.param(
        "A100:2x", "'2x' is not a name list, a memory size or a count", id="bad-part"
    ),
    pytest.param(
        "A100,,H100",
        "'A100,,H100' is not a name list, a memory size or a count",
        id="empty-name",
    ),
    pytest.param(
        "A100:1.5", "'1.5' is not a name list, a memory size or a count", id="fraction"
    ),
    pytest.param(
        "A100:-1", "'-1' is not a name list, a memory size or a count", id="negative"
    ),
    pytest.param(
        "A 100", "'A 100' is not a name list, a memory size or a count", id="name-space"
    ),
    pytest.param(
        "A100:80XB",
        "'80XB' is not a name list, a memory size or a count",
        id="unknown-unit",
    ),
]


@pytest.mark.parametrize(("text", "expected"), GPU_ACCEPTED)
def test_parse_gpu_accepts_form(text: str, expected: GpuSpec) -> None:
    assert parse_gpu(text) == expected


@pytest.mark.parametrize(("text", "problem"), GPU_REJECTED)
def test_parse_gpu_rejects_form(text: str, problem: str | None) -> None:
    with pytest.raises(
        InvalidValueError, match=expected_message("gpu", text, GPU_FORMS)
    ) as caught:
        parse_gpu(text)

    if problem is not None:
        assert problem in str(caught.value)


def test_parse_gpu_defaults_count_to_one() -> None:
    spec = parse_gpu("A100")

    assert spec.count == Range(1, 1)


@pytest.mark.parametrize(("text", "spec"), GPU_ACCEPTED)
def test_format_gpu_round_trips_through_parse(text: str, spec: GpuSpec) -> None:
    assert parse_gpu(format_gpu(spec)) == spec


FORMATTED_GPUS = [
    pytest.param(GpuSpec(names=("A100",)), "A100:1", id="name"),
    pytest.param(
        GpuSpec(names=("A100", "H100"), memory=Range(80.0, None), count=Range(2, 2)),
        "A100,H100:80GB..:2",
        id="all-parts",
    ),
    pytest.param(GpuSpec(count=Range(1, 4)), "1..4", id="count-only"),
]


@pytest.mark.parametrize(("spec", "expected"), FORMATTED_GPUS)
def test_format_gpu_prints_form(spec: GpuSpec, expected: str) -> None:
    assert format_gpu(spec) == expected


# Spot policy, price, backends


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("spot", "spot", id="spot"),
        pytest.param("on-demand", "on-demand", id="on-demand"),
        pytest.param("auto", "auto", id="auto"),
        pytest.param("Spot", "spot", id="capitalised"),
        pytest.param(" auto ", "auto", id="surrounding-space"),
    ],
)
def test_parse_spot_policy_accepts_form(text: str, expected: str) -> None:
    assert parse_spot_policy(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("ondemand", id="no-hyphen"),
        pytest.param("on_demand", id="underscore"),
        pytest.param("preemptible", id="other-word"),
    ],
)
def test_parse_spot_policy_rejects_form(text: str) -> None:
    with pytest.raises(
        InvalidValueError,
        match=expected_message("spot policy", text, SPOT_POLICY_FORMS),
    ):
        parse_spot_policy(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("0", 0.0, id="zero"),
        pytest.param("2", 2.0, id="integer"),
        pytest.param("0.5", 0.5, id="decimal"),
        pytest.param("1.25", 1.25, id="cents"),
        pytest.param(" 1.5 ", 1.5, id="surrounding-space"),
    ],
)
def test_parse_price_accepts_form(text: str, expected: float) -> None:
    assert parse_price(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("-1", id="negative"),
        pytest.param("$1", id="currency-sign"),
        pytest.param(".5", id="no-leading-digit"),
        pytest.param("1e2", id="exponent"),
        pytest.param("inf", id="infinity"),
        pytest.param("nan", id="not-a-number"),
        pytest.param("9" * 400, id="overflows-float"),
    ],
)
def test_parse_price_rejects_form(text: str) -> None:
    with pytest.raises(
        InvalidValueError, match=expected_message("max price", text, PRICE_FORMS)
    ):
        parse_price(text)


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        pytest.param("aws", ("aws",), id="one-name"),
        pytest.param("aws,local", ("aws", "local"), id="comma-list"),
        pytest.param(["aws", "local"], ("aws", "local"), id="items"),
        pytest.param(["aws, ssh", "local"], ("aws", "ssh", "local"), id="mixed"),
        pytest.param("AWS", ("aws",), id="upper-case"),
        pytest.param(["aws", "aws"], ("aws",), id="duplicate-dropped"),
        pytest.param([], None, id="no-items-means-any"),
    ],
)
def test_parse_backends_accepts_form(
    names: str | list[str], expected: tuple[str, ...] | None
) -> None:
    assert parse_backends(names) == expected


@pytest.mark.parametrize(
    "names",
    [
        pytest.param("", id="empty"),
        pytest.param("aws,", id="trailing-comma"),
        pytest.param("aws local", id="space-separated"),
        pytest.param("1aws", id="leading-digit"),
    ],
)
def test_parse_backends_rejects_form(names: str) -> None:
    with pytest.raises(
        InvalidValueError, match=expected_message("backend", names, BACKENDS_FORMS)
    ):
        parse_backends(names)


# Requirements


def test_build_requirements_keeps_defaults() -> None:
    assert build_requirements() == Requirements()


def test_build_requirements_default_cpu_and_memory() -> None:
    requirements = build_requirements()

    assert requirements.cpu == Range(2, None)
    assert requirements.memory == Range(8, None)


@pytest.mark.parametrize(
    ("field", "text", "expected"),
    [
        pytest.param("cpu", "4..", Requirements(cpu=Range(4, None)), id="cpu"),
        pytest.param(
            "memory", "16GB..", Requirements(memory=Range(16.0, None)), id="memory"
        ),
        pytest.param(
            "disk", "..1TB", Requirements(disk=Range(None, 1024.0)), id="disk"
        ),
        pytest.param(
            "gpu",
            "A100:2",
            Requirements(gpu=GpuSpec(names=("A100",), count=Range(2, 2))),
            id="gpu",
        ),
        pytest.param(
            "spot_policy", "auto", Requirements(spot_policy="auto"), id="spot-policy"
        ),
        pytest.param("max_price", "1.5", Requirements(max_price=1.5), id="max-price"),
        pytest.param(
            "backends",
            "aws,local",
            Requirements(backends=("aws", "local")),
            id="backends",
        ),
    ],
)
def test_build_requirements_parses_field(
    field: str, text: str, expected: Requirements
) -> None:
    assert build_requirements(**{field: text}) == expected


@pytest.mark.parametrize(
    ("field", "text", "message"),
    [
        pytest.param("cpu", "8..4", "invalid cpu '8..4'", id="cpu"),
        pytest.param("memory", "16XB", "invalid memory '16XB'", id="memory"),
        pytest.param("disk", "-1GB", "invalid disk '-1GB'", id="disk"),
        pytest.param("gpu", "A100::2", "invalid gpu 'A100::2'", id="gpu"),
        pytest.param(
            "spot_policy", "sometimes", "invalid spot policy 'sometimes'", id="spot"
        ),
        pytest.param("max_price", "-1", "invalid max price '-1'", id="max-price"),
        pytest.param("backends", "a b", "invalid backend 'a b'", id="backends"),
    ],
)
def test_build_requirements_names_field_in_error(
    field: str, text: str, message: str
) -> None:
    with pytest.raises(InvalidValueError, match=f"^{re.escape(message)}"):
        build_requirements(**{field: text})
