"""BNP's options and what each accepts, written once and torch-free: the library (``bnp.BNP``)
and the runner's config schema (``NormConfig`` in bnp.config) both check their values here, so the
two can never accept different things. Each message names the option and what it accepts."""

from __future__ import annotations

import math
from typing import Any

MOMENTS = ("auto", "one_pass", "two_pass")
FLAGS = ("center", "scale", "sync", "fast", "eps_relative", "average_start")


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def problems(momentum: Any = None, eps: Any = 0.01, warmup: Any = 0, moments: Any = "auto",
             **flags: Any) -> list[tuple[str, str, Any]]:
    """(option, what it accepts, the value given) for every option whose value is not accepted."""
    found = []
    if momentum is not None and not (_number(momentum) and 0 < momentum <= 1):
        found.append(("momentum", "None (auto: min(0.1, batch size / 100)) or a number in (0, 1]", momentum))
    if not is_positive(eps):
        found.append(("eps", "a finite number > 0", eps))
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        found.append(("warmup", "an integer >= 0 (steps)", warmup))
    if moments not in MOMENTS:
        found.append(("moments", f"one of {list(MOMENTS)}", moments))
    for name, value in flags.items():
        if name not in FLAGS:
            raise TypeError(f"unknown BNP option {name!r}")
        if not isinstance(value, bool):
            found.append((name, "True or False", value))
    return found


def is_positive(value: Any) -> bool:
    """A finite number > 0 (clip, trust, eps of the gradient rules)."""
    return _number(value) and value > 0 and math.isfinite(value)


def check_positive(where: str, name: str, value: Any) -> None:
    if not is_positive(value):
        raise ValueError(f"{where}{name} must be a finite number > 0, got {value!r}")


def check(where: str, **options: Any) -> None:
    """Raise ValueError naming the first option that is not accepted, as ``<where><option>``."""
    for name, accepted, value in problems(**options):
        raise ValueError(f"{where}{name} must be {accepted}, got {value!r}")
