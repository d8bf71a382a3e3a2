"""Durations as users write them: ``"500ms"``, ``"1s"``, ``"2m"``, ``"1h"``, seconds, a timedelta.

One parser serves the API (windows, slides, timeouts, the batch interval), the CLI and the
``DSTREAM_*`` settings, so every place accepts the same forms and says the same thing about
a value it cannot read.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import TypeAlias

from engine.errors import DStreamError

#: What a duration argument accepts.
Duration: TypeAlias = "str | float | int | timedelta"

#: The forms, as said in every error message.
FORMS = '"500ms", "1s", "2m", "1h", a number of seconds or a datetime.timedelta'

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_TEXT = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*(ms|s|m|h)?\s*", re.IGNORECASE)


class DurationError(DStreamError, ValueError):
    """A value that is not a duration (a ``ValueError`` too, so settings validation keeps it)."""


def to_seconds(value: Duration, what: str = "duration") -> float:
    """The number of seconds *value* stands for; *what* names the argument in the error.

    Accepts ``"500ms"``, ``"1s"``, ``"1.5s"``, ``"2m"``, ``"1h"`` (case-insensitive; a bare
    number in a string is seconds), an int or float of seconds, or a ``timedelta``. The sign
    is not checked here: a caller that needs a positive duration says so itself.

    Raises:
        DurationError: for anything else (a bool, NaN, infinity, ``"1 sec"``, ``"-"``...).

    """
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
    elif isinstance(value, str):
        m = _TEXT.fullmatch(value)
        if m is not None:
            return float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()]
    msg = f"{what}: cannot read {value!r} as a duration; use {FORMS}"
    raise DurationError(msg)
