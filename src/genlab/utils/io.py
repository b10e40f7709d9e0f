"""Placeholder until the plumbing branch lands (atomic writes and file hashes, once)."""

from genlab.metrics.extractors import file_version as file_sha256  # noqa: F401
