"""Seeds derived from a run's seed and a purpose: stable across processes, machines and Python
versions (unlike ``hash``), so that every rank, step and data item has its own reproducible
stream (callbacks/step_seeds.py, data/resumable.py)."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, e.g. ``(seed, "train", rank, step)``."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_all(seed: int) -> None:
    """Seed torch (every device), numpy and Python's ``random`` from one 63-bit seed."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
