"""One exception family, so the CLI can print a single clear line for any user error."""


class NeuralpathError(ValueError):
    """Bad input or an impossible request; the message says what, where, and what to do."""


def check_choice(name: str, value, choices):
    """Raise a one-line ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise NeuralpathError(f"{name}={value!r} is not known; choose one of {', '.join(map(str, choices))}")
    return value


def check_positive_int(name: str, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise NeuralpathError(f"{name}={value!r} must be a positive integer")
    return value


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """The value of environment variable ``name``, one of ``choices`` (``default`` when unset or empty); anything
    else is a one-line error naming the variable and what it takes."""
    import os

    v = os.environ.get(name, "").strip() or default
    if v not in choices:
        raise NeuralpathError(f"environment variable {name}={v!r}: use one of {', '.join(choices)} (or leave it unset)")
    return v
