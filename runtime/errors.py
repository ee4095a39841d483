"""The one exception every step shares, in a module of its own so a command line can raise it without importing
the harness (pydantic, the HTTP client)."""


class BadInput(ValueError):
    """Input the run can never succeed on: exit 2, and the Job fails at once instead of retrying."""
