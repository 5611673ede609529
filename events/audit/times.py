"""Time options of the audit commands: ISO 8601, ``now`` and times relative to now.

Times inside the log are UTC microseconds since the Unix epoch. A user gives a
time as ISO 8601 (``2025-03-01T12:00``, ``2025-03-01 12:00:00Z``), as ``now``,
or relative to now (``-2h``, ``-1h30m``, with the amount in the grammar of
``events.grammar.parse_duration``). An ISO time without an offset is local
time, or UTC when the command prints UTC.
"""

import re
from datetime import UTC, datetime, timedelta

from events.errors import InvalidValueError
from events.grammar import parse_duration

TIME_FORMS = (
    "an ISO 8601 time (2025-03-01T12:00:00, 2025-03-01 12:00Z), 'now', or a time "
    "relative to now (-2h, -30m, -1d12h)"
)
AT_FORMS = f"a log position (a whole number such as 42) or {TIME_FORMS}"

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MICROSECOND = timedelta(microseconds=1)
_POSITION_RE = re.compile(r"[0-9]{1,18}", re.ASCII)


def parse_time(
    text: str, now_us: int, *, field: str = "time", utc: bool = False
) -> int:
    """Parse a time option into UTC microseconds since the Unix epoch.

    ``now_us`` anchors ``now`` and the relative forms. With ``utc``, an ISO time
    without an offset is read as UTC instead of local time.

    Raises:
        InvalidValueError: naming ``field``, the text and the accepted forms.
    """
    stripped = text.strip()
    if stripped == "now":
        return now_us

    if stripped.startswith("-"):
        return now_us - _relative_seconds(stripped[1:], text, field) * 1_000_000

    try:
        parsed = datetime.fromisoformat(stripped)
    except ValueError:
        raise InvalidValueError(field, text, TIME_FORMS) from None

    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC) if utc else parsed.astimezone()

    return to_microseconds(parsed)


def _relative_seconds(amount: str, text: str, field: str) -> int:
    try:
        seconds = parse_duration(amount, field)
    except InvalidValueError:
        raise InvalidValueError(field, text, TIME_FORMS) from None

    if seconds == "off":
        raise InvalidValueError(field, text, TIME_FORMS)

    return seconds


def parse_position(text: str) -> int | None:
    """Return ``text`` as a log position when it is a whole number, else ``None``."""
    stripped = text.strip()
    if _POSITION_RE.fullmatch(stripped):
        return int(stripped)

    return None


def to_microseconds(moment: datetime) -> int:
    """Convert an aware datetime to UTC microseconds, exactly."""
    return (moment - EPOCH) // _ONE_MICROSECOND


def utc_iso(microseconds: int) -> str:
    """Format UTC microseconds as ISO 8601 with a ``+00:00`` offset.

    Integer arithmetic keeps every microsecond; going through a float timestamp
    would round some of them.
    """
    return (EPOCH + timedelta(microseconds=microseconds)).isoformat()
