"""Choosing batches: pure functions over token lengths, so they are unit-tested without a model."""

from __future__ import annotations

from collections.abc import Sequence

# Rows per call when task.batch_size is unset: translate's batches (generate sizes its decode
# slots from a KV-cache budget: models/decoding.py auto_slots).
ROWS_PER_CALL = 32


def length_sorted_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None
) -> list[list[int]]:
    """Indices of `lengths` grouped into batches of similar length, longest first.

    A batch holds at most `batch_size` rows and, when `max_tokens` is given, at most `max_tokens`
    padded tokens (rows x longest row); a single row longer than the budget still gets a batch of
    its own. Sorting is stable, so equal lengths keep input order and the plan is deterministic.
    The caller restores input order from the indices.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i]
        grown = max(longest, n)
        too_many = len(current) >= batch_size
        too_big = max_tokens is not None and current and grown * (len(current) + 1) > max_tokens
        if current and (too_many or too_big):
            batches.append(current)
            current, grown = [], n
        current.append(i)
        longest = grown
    if current:
        batches.append(current)
    return batches
