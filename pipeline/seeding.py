"""Seeds: one derived from any keys (``derive_seed``) and the global RNGs of a process
(``seed_everything``). Result-carrying: every view, sample order and initialisation follows them.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends only on ``keys`` (ints or strings), via NumPy's SeedSequence.

    Strings are hashed with SHA-256 so the result is stable across processes and Python versions
    (unlike ``hash()``).
    """
    entropy = []
    for key in keys:
        if isinstance(key, str):
            entropy.append(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))
        else:
            entropy.append(int(key))
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32).view(np.uint64)[0] & ((1 << 63) - 1))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch imported only here)."""
    import torch  # noqa: PLC0415  (torch-free callers of derive_seed never pay for it)

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
