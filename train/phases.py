"""The four-phase recipe as data: which phase a global step is in."""

from __future__ import annotations

from dataclasses import dataclass

from .config import PhaseConfig
from .data import DataOptions


@dataclass(frozen=True)
class ActivePhase:
    index: int
    phase: PhaseConfig
    start_step: int  # first global step of the phase
    end_step: int  # first global step after it


class PhaseSchedule:
    def __init__(self, phases: list[PhaseConfig]):
        self.phases = list(phases)
        self.bounds = []
        start = 0
        for i, phase in enumerate(self.phases):
            self.bounds.append(ActivePhase(i, phase, start, start + phase.steps))
            start += phase.steps
        self.total_steps = start

    def at(self, step: int) -> ActivePhase:
        """The phase that global step ``step`` (0-based) belongs to."""
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} is outside the schedule (0..{self.total_steps - 1})")
        for bound in self.bounds:
            if step < bound.end_step:
                return bound
        raise AssertionError("unreachable")


def data_options(phase: PhaseConfig, buckets: list[list[int]]) -> DataOptions:
    return DataOptions(
        prompt_mode=phase.prompt_mode,
        fixed_prompt=phase.fixed_prompt,
        text_dropout=phase.text_dropout,
        paired_ratio=phase.paired_ratio,
        min_quality=phase.min_quality,
        buckets=tuple((int(w), int(h)) for w, h in buckets),
    )
