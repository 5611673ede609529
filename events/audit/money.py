"""Exact money arithmetic for cost reports.

A price is USD per hour and a duration is in microseconds, so the exact cost
of an interval is ``price in micro-USD per hour * microseconds`` in units of
micro-USD per 3.6e9. Sums stay in those integer units, so parts add up to the
whole exactly; amounts are rounded to whole micro-USD only when shown.
"""

from decimal import ROUND_HALF_EVEN, Decimal

MICROSECONDS_PER_HOUR = 3_600_000_000


def price_units(price_per_hour: float) -> int:
    """Convert a USD-per-hour price to whole micro-USD per hour.

    The float's shortest decimal form is used, so ``0.1`` is exactly 100000.
    NOTE: a price with more than 6 decimals is rounded to micro-USD per hour.
    """
    exact = Decimal(repr(price_per_hour)) * 1_000_000

    return int(exact.to_integral_value(ROUND_HALF_EVEN))


def micro_usd(units: int) -> int:
    """Round exact cost units to whole micro-USD, half to even."""
    quotient, remainder = divmod(units, MICROSECONDS_PER_HOUR)
    twice = 2 * remainder
    if twice > MICROSECONDS_PER_HOUR or (
        twice == MICROSECONDS_PER_HOUR and quotient % 2 == 1
    ):
        quotient += 1

    return quotient


def split_rounded(parts: list[int]) -> list[int]:
    """Round ``parts`` to micro-USD so that they add up to their rounded sum.

    Each part is the difference of consecutive rounded running sums, so it is
    within one micro-USD of its exact value.
    """
    rounded = []
    running = 0
    previous = 0
    for part in parts:
        running += part
        current = micro_usd(running)
        rounded.append(current - previous)
        previous = current

    return rounded


def format_usd(micro: int) -> str:
    """Format micro-USD as a decimal string with 6 places, e.g. ``-1.250000``."""
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), 1_000_000)

    return f"{sign}{whole}.{fraction:06d}"
