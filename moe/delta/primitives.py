"""Tensor primitives shared by delta compression (moe/delta/) and merging (moe/merge/).

Where the maths is the same the code is one: the per-tensor random generator, DARE's
drop-and-rescale mask and the top-k magnitude keep set.
"""

from __future__ import annotations

import hashlib

import torch


def tensor_generator(seed: int, name: str, index: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, tensor name, model index).

    Seeding per tensor (not one stream over the whole merge) makes a tensor's random mask
    independent of the order tensors are visited and of which other tensors exist.
    """
    digest = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
