"""Rows and tokens, counted one way: a shard's record, what one run did and a folder's totals are
all `Counts`, and add up with `+`.

    total = Counts.total(records)      # completion records (dicts) of shards
    total.rows_in == total.rows_out + total.rows_rejected
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field


@dataclass
class Counts:
    shards: int = 0
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    usage: dict[str, int] = field(default_factory=dict)
    """generate: prompt_tokens, completion_tokens, unparsed (see TaskOutput.usage)."""
    model_seconds: float = 0.0
    """Seconds in the model (a shard record's seconds['model']): rows/s of model time."""

    def __add__(self, other: Counts) -> Counts:
        def add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            out = dict(a)
            for k, n in b.items():
                out[k] = out.get(k, 0) + n
            return dict(sorted(out.items()))

        return Counts(
            shards=self.shards + other.shards,
            rows_in=self.rows_in + other.rows_in,
            rows_out=self.rows_out + other.rows_out,
            rows_rejected=self.rows_rejected + other.rows_rejected,
            rejected_by_reason=add(self.rejected_by_reason, other.rejected_by_reason),
            tokens=self.tokens + other.tokens,
            usage=add(self.usage, other.usage),
            model_seconds=self.model_seconds + other.model_seconds,
        )

    @classmethod
    def of(cls, record: dict) -> Counts:
        """One shard's counts, from its completion record (or a ShardResult as a dict)."""
        return cls(
            shards=1,
            rows_in=record["rows_in"],
            rows_out=record["rows_out"],
            rows_rejected=record["rows_rejected"],
            rejected_by_reason=dict(record["rejected_by_reason"]),
            tokens=record["tokens"],
            usage=dict(record.get("usage") or {}),
            model_seconds=(record.get("seconds") or {}).get("model", 0.0),
        )

    @classmethod
    def total(cls, records: Iterable[dict]) -> Counts:
        return sum((cls.of(r) for r in records), cls())

    def as_dict(self) -> dict:
        return asdict(self)
