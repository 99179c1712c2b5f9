"""The unit every later stage consumes: one token sequence with its training labels."""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE = -100  # label of a position that carries no loss


@dataclass
class Sequence:
    input_ids: list[int]
    labels: list[int]  # same length; IGNORE where not trained, else the token id at that position
    # Per-token loss weight is implied: 1 where labels != IGNORE. Kept as a field for future use.
    source: dict = field(default_factory=dict)  # e.g. {"line": 12, "turn": 3} for reports

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE)
