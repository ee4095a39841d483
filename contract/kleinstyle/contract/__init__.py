"""The contract between the operator and the runtime: what a Job reads, what it reports back, and the pure policies
status shows.

Both `kleinstyle.operator` and `kleinstyle.runtime` import this package and never each other; it imports neither,
and nothing heavier than pydantic and the standard library (no torch, PIL, httpx or kopf), so the operator image,
which installs only the `operator` extra, can load every policy it shows in status. import-linter checks all of this
in `make test` (the contracts are in pyproject.toml). docs/runspec.md describes the contract as a whole.
"""
