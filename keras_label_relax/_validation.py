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
