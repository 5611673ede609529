"""Text grammars of user-facing values: durations, sizes, ranges, GPU specs, spot
policy, max price, and the requirements built from them.

Every entry point (CLI flags sent to the daemon as strings, config files, the
socket API) parses through these functions, so a value is accepted or rejected the
same way everywhere. Each parser raises ``InvalidValueError`` with the field name
the user typed, the value and the accepted forms. The ``format_*`` functions print
values so that the matching parser reads them back to the same value.
"""

import re
from collections.abc import Iterable
from typing import Literal

from events.errors import InvalidValueError
from events.model import Duration, GpuSpec, Range, Requirements, SpotPolicy

RangeUnit = Literal["count", "size"]

DURATION_FORMS = (
    "seconds (300), a number with a unit s, m, h, d or w (5m, 1h30m), 'off' or '0'"
)
SIZE_FORMS = (
    "a non-negative number with a unit MB, GB or TB (512MB, 80GB, 1.5TB) "
    "or a bare number of GB (16)"
)
COUNT_RANGE_FORMS = (
    "a non-negative integer (2) or a range A..B, A.. or ..B of them (1..4, 2.., ..8)"
)
SIZE_RANGE_FORMS = (
    "a size (80GB) or a range A..B, A.. or ..B of sizes (8GB.., ..1TB, 512MB..2GB), "
    "where a size is a non-negative number with a unit MB, GB or TB "
    "or a bare number of GB"
)
GPU_FORMS = (
    "colon-separated parts in any order, each at most once: GPU names (A100 or "
    "A100,H100), memory per GPU with a unit (80GB, 24GB..) and a count (2, 1..4), "
    "e.g. A100:80GB:2"
)
SPOT_POLICY_FORMS = "'spot', 'on-demand' or 'auto'"
PRICE_FORMS = "a non-negative price in USD per hour (0.5, 2, 1.25)"
BACKENDS_FORMS = "backend names separated by commas (local, aws)"

# Units in the order a compound duration must use them, largest first.
_DURATION_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}

# Durations are capped so that a deadline computed from one (a timestamp plus the
# duration) stays far inside what datetime and int64 columns can hold.
MAX_DURATION_SECONDS = 100 * 365 * 86400

# Integers get at most 18 digits, so they fit in int64 and stay below Python's
# limit on int() of long digit strings.
_INTEGER = r"[0-9]{1,18}"
_DECIMAL = r"[0-9]+(?:\.[0-9]+)?"

_INTEGER_RE = re.compile(_INTEGER, re.ASCII)
_DECIMAL_RE = re.compile(_DECIMAL, re.ASCII)
_DURATION_PART_RE = re.compile(rf"({_INTEGER})\s*([A-Za-z]+)\s*", re.ASCII)
_SIZE_RE = re.compile(rf"({_DECIMAL})\s*([A-Za-z]*)", re.ASCII)
_GPU_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*", re.ASCII)
_BACKEND_RE = re.compile(r"[a-z][a-z0-9_-]*", re.ASCII)

_SIZE_UNITS_GB = {"": 1.0, "mb": 1 / 1024, "gb": 1.0, "tb": 1024.0}
_SPOT_POLICIES: tuple[SpotPolicy, ...] = ("spot", "on-demand", "auto")


def _invalid(
    field: str, value: str, forms: str, problem: str | None = None
) -> InvalidValueError:
    expected = forms if problem is None else f"{forms}, but {problem}"

    return InvalidValueError(field, value, expected)


# Durations


def parse_duration(text: str, field: str = "duration") -> Duration:
    """Parse a duration into seconds, or ``"off"`` for never.

    Accepted: bare seconds (``300``), a number with a unit s, m, h, d or w
    (``5m``, ``5 m``), a compound of such parts (``1h30m``, ``1h 30m``), ``off``
    and ``0``. Units are lower case because ``M`` could be read as months. In a
    compound the units go from largest to smallest, each at most once, so
    ``30m1h`` and ``1h1h`` are rejected as likely typos. Values above
    ``MAX_DURATION_SECONDS`` (100 years) are rejected: use ``off`` for never.
    """
    stripped = text.strip()
    if stripped == "off":
        return "off"

    if _INTEGER_RE.fullmatch(stripped):
        seconds = int(stripped)
    else:
        seconds = _parse_compound_duration(stripped, field, text)

    if seconds > MAX_DURATION_SECONDS:
        raise _invalid(
            field,
            text,
            DURATION_FORMS,
            f"durations are limited to {MAX_DURATION_SECONDS} seconds (100 years); "
            "use 'off' for never",
        )

    return seconds


def _parse_compound_duration(stripped: str, field: str, text: str) -> int:
    units = list(_DURATION_UNITS)
    seconds = 0
    previous_rank = -1
    position = 0
    while position < len(stripped):
        match = _DURATION_PART_RE.match(stripped, position)
        if match is None:
            raise _invalid(field, text, DURATION_FORMS)

        number, unit = match.groups()
        if unit not in _DURATION_UNITS:
            problem = None
            if unit.lower() in _DURATION_UNITS:
                problem = f"units are lower case ({number}{unit.lower()})"

            raise _invalid(field, text, DURATION_FORMS, problem)

        rank = units.index(unit)
        if rank <= previous_rank:
            raise _invalid(
                field,
                text,
                DURATION_FORMS,
                "units must go from largest to smallest, each at most once",
            )

        seconds += int(number) * _DURATION_UNITS[unit]
        previous_rank = rank
        position = match.end()

    if position == 0:
        raise _invalid(field, text, DURATION_FORMS)

    return seconds


def format_duration(value: Duration | None) -> str:
    """Format a duration for display and for ``parse_duration`` to read back.

    Hours are the largest unit (``72h``, ``1h30m``), ``0`` is ``0s``, ``off`` stays
    ``off``, and ``None`` (not set) is ``-``.

    Raises:
        ValueError: ``value`` is a negative number of seconds.
    """
    if value is None:
        return "-"

    if isinstance(value, str):
        return value

    if value < 0:
        raise ValueError(f"cannot format negative duration {value}")

    if value == 0:
        return "0s"

    hours, rest = divmod(value, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [
        f"{amount}{unit}"
        for amount, unit in ((hours, "h"), (minutes, "m"), (seconds, "s"))
        if amount
    ]

    return "".join(parts)


# Sizes and ranges


def parse_size(text: str, field: str = "size") -> float:
    """Parse a size into GB: ``512MB``, ``80GB``, ``1.5 TB``, or ``16`` for 16GB.

    Units are case-insensitive and count in powers of 1024: 1TB is 1024GB and
    1024MB is 1GB.
    """
    size = _match_size(text.strip())
    if size is None:
        raise _invalid(field, text, SIZE_FORMS)

    return size[0]


def _match_size(text: str) -> tuple[float, bool] | None:
    """Return the size in GB and whether a unit was written, or None if invalid."""
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        return None

    number, unit = match.groups()
    factor = _SIZE_UNITS_GB.get(unit.lower())
    if factor is None:
        return None

    gb = float(number) * factor
    if gb == float("inf"):
        return None

    return gb, unit != ""


def _match_count(text: str) -> int | None:
    if _INTEGER_RE.fullmatch(text) is None:
        return None

    return int(text)


def parse_range(text: str, field: str = "range", *, unit: RangeUnit) -> Range:
    """Parse ``A..B``, ``A..``, ``..B`` or ``A`` (exactly A) into a ``Range``.

    For ``unit="count"`` the bounds are non-negative integers; for ``"size"``
    they follow ``parse_size`` and come out in GB.
    """
    forms = COUNT_RANGE_FORMS if unit == "count" else SIZE_RANGE_FORMS
    parsed = _match_range(text.strip(), unit)
    if parsed is None:
        raise _invalid(field, text, forms)

    bounds, _ = parsed
    if _is_reversed(bounds):
        raise _invalid(field, text, forms, "the lower bound is above the upper bound")

    return bounds


def _match_range(text: str, unit: RangeUnit) -> tuple[Range, bool] | None:
    """Return the range and whether any bound has a size unit, or None if invalid.

    A reversed range is returned as is, so that the caller can name the problem.
    """
    lower_text, separator, upper_text = text.partition("..")
    if not separator:
        lower_text = upper_text = text

    bounds: list[float | None] = []
    has_unit = False
    for bound_text in (lower_text.strip(), upper_text.strip()):
        if not bound_text:
            bounds.append(None)
            continue

        if unit == "count":
            count = _match_count(bound_text)
            if count is None:
                return None

            bounds.append(count)
        else:
            size = _match_size(bound_text)
            if size is None:
                return None

            bounds.append(size[0])
            has_unit = has_unit or size[1]

    if bounds == [None, None]:
        return None

    return Range(bounds[0], bounds[1]), has_unit


def _is_reversed(bounds: Range) -> bool:
    return bounds.min is not None and bounds.max is not None and bounds.min > bounds.max


def format_size(gb: float) -> str:
    """Format a size in GB as ``512MB``, ``80GB`` or ``2TB`` for ``parse_size``.

    TB is used for whole multiples of 1024GB and MB below 1GB, and numbers are
    rounded to 6 decimals.
    """
    if gb >= 1024 and gb % 1024 == 0:
        return f"{_format_number(gb / 1024)}TB"

    if 0 < gb < 1:
        return f"{_format_number(gb * 1024)}MB"

    return f"{_format_number(gb)}GB"


def _format_number(value: float) -> str:
    if isinstance(value, int):
        return str(value)

    rounded = round(float(value), 6)
    if rounded.is_integer():
        return str(int(rounded))

    return repr(rounded)


def format_range(bounds: Range, unit: RangeUnit = "count") -> str:
    """Format a range as ``parse_range`` reads it: ``2``, ``2..``, ``..4``, ``2..4``.

    Sizes carry their unit (``8GB..``). A range without bounds prints as ``0..``,
    which means the same for these non-negative quantities.
    """
    format_bound = format_size if unit == "size" else _format_number
    if bounds.min is not None and bounds.min == bounds.max:
        return format_bound(bounds.min)

    if bounds.min is None and bounds.max is None:
        return f"{format_bound(0)}.."

    lower = "" if bounds.min is None else format_bound(bounds.min)
    upper = "" if bounds.max is None else format_bound(bounds.max)

    return f"{lower}..{upper}"


# GPUs


def parse_gpu(text: str, field: str = "gpu") -> GpuSpec:
    """Parse a GPU spec such as ``A100``, ``a100:2``, ``A100:80GB:2`` or ``24GB..:2``.

    The spec is colon-separated parts in any order: a comma list of names
    (upper-cased, duplicates dropped), a memory range per GPU (a part with a size
    unit) and a count range (a part without a unit). The count defaults to
    exactly 1, and a bare count (``2``) means that many GPUs of any name.
    """
    names: tuple[str, ...] | None = None
    memory: Range | None = None
    count: Range | None = None
    if not text.strip():
        raise _invalid(field, text, GPU_FORMS)

    for raw_part in text.split(":"):
        part = raw_part.strip()
        if not part:
            raise _invalid(field, text, GPU_FORMS, "a part is empty")

        quantity = _match_gpu_quantity(part)
        if quantity is None:
            part_names = _parse_gpu_names(part, field, text)
            if names is not None:
                raise _invalid(field, text, GPU_FORMS, "names are given twice")

            names = part_names
            continue

        kind, bounds = quantity
        if _is_reversed(bounds):
            raise _invalid(
                field,
                text,
                GPU_FORMS,
                f"the {kind} {part!r} has its lower bound above the upper bound",
            )

        if kind == "memory":
            if memory is not None:
                raise _invalid(field, text, GPU_FORMS, "memory is given twice")

            memory = bounds
        else:
            if count is not None:
                raise _invalid(field, text, GPU_FORMS, "the count is given twice")

            count = bounds

    return GpuSpec(
        names=names or (),
        memory=memory,
        count=Range(1, 1) if count is None else count,
    )


def _match_gpu_quantity(part: str) -> tuple[Literal["memory", "count"], Range] | None:
    """Classify a part as a count (no unit) or a memory range (a size unit)."""
    count = _match_range(part, "count")
    if count is not None:
        return "count", count[0]

    size = _match_range(part, "size")
    if size is not None and size[1]:
        return "memory", size[0]

    return None


def _parse_gpu_names(part: str, field: str, text: str) -> tuple[str, ...]:
    names: list[str] = []
    for raw_name in part.split(","):
        name = raw_name.strip()
        if not _GPU_NAME_RE.fullmatch(name):
            raise _invalid(
                field,
                text,
                GPU_FORMS,
                f"{part!r} is not a name list, a memory size or a count",
            )

        if name.upper() not in names:
            names.append(name.upper())

    return tuple(names)


def format_gpu(spec: GpuSpec) -> str:
    """Format a GPU spec as ``parse_gpu`` reads it, e.g. ``A100,H100:80GB..:2``."""
    parts = []
    if spec.names:
        parts.append(",".join(spec.names))

    if spec.memory is not None:
        parts.append(format_range(spec.memory, "size"))

    parts.append(format_range(spec.count, "count"))

    return ":".join(parts)


# Spot policy, price and requirements


def parse_spot_policy(text: str, field: str = "spot policy") -> SpotPolicy:
    """Parse ``spot``, ``on-demand`` or ``auto``, in any letter case."""
    normalized = text.strip().lower()
    for policy in _SPOT_POLICIES:
        if normalized == policy:
            return policy

    raise _invalid(field, text, SPOT_POLICY_FORMS)


def parse_price(text: str, field: str = "max price") -> float:
    """Parse a non-negative decimal price in USD per hour, e.g. ``0.5``."""
    stripped = text.strip()
    if _DECIMAL_RE.fullmatch(stripped) is None:
        raise _invalid(field, text, PRICE_FORMS)

    price = float(stripped)
    if price == float("inf"):
        raise _invalid(field, text, PRICE_FORMS)

    return price


def parse_backends(
    names: str | Iterable[str], field: str = "backend"
) -> tuple[str, ...] | None:
    """Parse backend names given as one comma list or as several items.

    Names are lower-cased and deduplicated. No names at all returns ``None``
    (any backend), because a repeatable CLI option that was never given arrives as
    an empty list.
    """
    items = [names] if isinstance(names, str) else list(names)
    backends: list[str] = []
    for item in items:
        for raw_name in item.split(","):
            name = raw_name.strip().lower()
            if not _BACKEND_RE.fullmatch(name):
                raise _invalid(field, item, BACKENDS_FORMS)

            if name not in backends:
                backends.append(name)

    return tuple(backends) or None


def build_requirements(
    cpu: str | None = None,
    memory: str | None = None,
    disk: str | None = None,
    gpu: str | None = None,
    spot_policy: str | None = None,
    max_price: str | None = None,
    backends: str | Iterable[str] | None = None,
) -> Requirements:
    """Build ``Requirements`` from the text forms of its fields.

    A ``None`` argument keeps the default of ``Requirements`` (cpu ``2..``, memory
    ``8GB..``, no GPU, no disk, on-demand, no max price, any backend). ``cpu`` is a
    count range, ``memory`` and ``disk`` are size ranges.
    """
    defaults = Requirements()

    return Requirements(
        cpu=defaults.cpu if cpu is None else parse_range(cpu, "cpu", unit="count"),
        memory=(
            defaults.memory
            if memory is None
            else parse_range(memory, "memory", unit="size")
        ),
        gpu=defaults.gpu if gpu is None else parse_gpu(gpu, "gpu"),
        disk=defaults.disk if disk is None else parse_range(disk, "disk", unit="size"),
        spot_policy=(
            defaults.spot_policy
            if spot_policy is None
            else parse_spot_policy(spot_policy)
        ),
        max_price=defaults.max_price if max_price is None else parse_price(max_price),
        backends=defaults.backends if backends is None else parse_backends(backends),
    )
