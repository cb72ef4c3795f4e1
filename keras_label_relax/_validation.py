"""Argument checks that raise `ValueError` naming the argument and value."""

import math
import numbers


def check_number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"Argument `{name}` must be a real number. Received: {name}={value!r}"
        )
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(
            f"Argument `{name}` must be finite. Received: {name}={value!r}"
        )
    return value


def check_in_unit_interval(name, value):
    """Checks `0 <= value < 1`, returns it as a float."""
    value = check_number(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"Argument `{name}` must be in [0, 1). Received: {name}={value!r}"
        )
    return value


def check_non_negative(name, value):
    value = check_number(name, value)
    if value < 0.0:
        raise ValueError(f"Argument `{name}` must be >= 0. Received: {name}={value!r}")
    return value


def check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(
            f"Argument `{name}` must be a bool. Received: {name}={value!r}"
        )
    return value


def check_at_least(name, value, minimum, why=""):
    """Checks `value >= minimum`, returns it as a float."""
    value = check_number(name, value)
    if value < minimum:
        raise ValueError(
            f"Argument `{name}` must be >= {minimum}{why}. Received: {name}={value!r}"
        )
    return value


def check_sample_dependent_gammas(thresholds, gammas):
    """Checks a piecewise-constant gamma schedule; returns both as float tuples.

    `thresholds` must be strictly increasing inside (0, 1), and `gammas`,
    each `>= 0`, must have one entry more than `thresholds`.
    """
    thresholds = _check_sequence("thresholds", thresholds)
    gammas = _check_sequence("gammas", gammas)
    values = tuple(check_number("thresholds", value) for value in thresholds)
    if any(not 0.0 < value < 1.0 for value in values) or any(
        b <= a for a, b in zip(values, values[1:], strict=False)
    ):
        raise ValueError(
            "Argument `thresholds` must be strictly increasing and inside (0, 1). "
            f"Received: thresholds={thresholds!r}"
        )
    if len(gammas) != len(values) + 1:
        raise ValueError(
            "Argument `gammas` must have one entry more than `thresholds` "
            f"({len(values) + 1}). Received: gammas={gammas!r}, "
            f"thresholds={thresholds!r}"
        )
    for value in gammas:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(
                f"Argument `gammas` must hold real numbers. Received: gammas={gammas!r}"
            )
        if not math.isfinite(value) or value < 0.0:
            raise ValueError(
                "Argument `gammas` must hold finite numbers >= 0. "
                f"Received: gammas={gammas!r}"
            )
    return values, tuple(float(value) for value in gammas)


def _check_sequence(name, value):
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(
            f"Argument `{name}` must be a sequence of numbers. "
            f"Received: {name}={value!r}"
        )
    return tuple(value)


def check_num_bins(value, name="num_bins"):
    """Checks an integer >= 1, returns it as an `int`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"Argument `{name}` must be an integer >= 1. Received: {name}={value!r}"
        )
    if value < 1:
        raise ValueError(f"Argument `{name}` must be >= 1. Received: {name}={value!r}")
    return int(value)


def check_choice(name, value, choices):
    """Checks that `value` is one of `choices`, returns it."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"Argument `{name}` must be one of {choices}. Received: {name}={value!r}"
        )
    return value
