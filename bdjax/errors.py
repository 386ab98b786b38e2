"""The one exception type bdjax raises for bad input.

The CLI turns it into a single line on stderr and exit code 2; library users catch it
like any ``ValueError``.
"""


class BdjaxError(ValueError):
    """Bad input: the message names the bad value and what is accepted."""


def check_choice(kind: str, value, accepted) -> None:
    """Raises BdjaxError unless ``value`` is one of ``accepted``."""
    accepted = list(accepted)
    if value not in accepted:
        raise BdjaxError(
            f"unknown {kind} {value!r}; accepted: {', '.join(map(str, accepted))}."
        )


def check_range(name: str, value, low, high, *, low_open=False, high_open=False) -> None:
    """Raises BdjaxError unless ``low <= value <= high`` (open ends as asked)."""
    ok = (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high
    )
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise BdjaxError(f"{name} {value!r} is out of range; accepted: {lo}{low}, {high}{hi}.")
