"""The held-out partition of a task's instances: an instance (its token row, question and answer) is held out when a
keyed hash of its tokens falls in a fixed fifth of the hash space. Training batches never contain such a row
(rejected and redrawn) and held-out sets contain only such rows, so the two are disjoint by construction whatever
the seeds; the tests check it on samples."""

from __future__ import annotations

import numpy as np

HELD_OUT_SHARE = 5  # one instance in HELD_OUT_SHARE is held out
_KEY = np.random.default_rng(20_250_221).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)


def row_hash(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash per row of non-negative token ids (uint64 arithmetic wraps round, as intended)."""
    rows = np.asarray(rows)
    if rows.shape[-1] > _KEY.size:
        raise ValueError(f"rows of {rows.shape[-1]} tokens are longer than the hash key ({_KEY.size})")
    with np.errstate(over="ignore"):
        h = (rows.astype(np.uint64) * _KEY[: rows.shape[-1]]).sum(axis=-1, dtype=np.uint64)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(29)
    return h


def is_held_out(rows: np.ndarray) -> np.ndarray:
    """True for the rows that belong to the held-out part of the instance space (validation or test)."""
    return row_hash(rows) % np.uint64(HELD_OUT_SHARE) == 0


def held_out_part(rows: np.ndarray, part: str) -> np.ndarray:
    """True for the held-out rows of `part`: "val" (choosing learning rates) or "test" (every reported number);
    the two halves of the held-out space never share a row."""
    if part not in ("val", "test"):
        raise ValueError(f"held-out part must be 'val' or 'test' (got {part!r})")
    h = row_hash(rows)
    return (h % np.uint64(HELD_OUT_SHARE) == 0) & ((h // np.uint64(HELD_OUT_SHARE)) % np.uint64(2) == (part == "val"))
