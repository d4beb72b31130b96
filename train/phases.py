"""The four-phase recipe as data: which phase a global step is in, and its learning rate."""

from __future__ import annotations

from dataclasses import dataclass

from .config import PhaseConfig


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

    def lr_at(self, step: int, base_lr: float, warmup_steps: int = 0) -> float:
        """Learning rate of the optimizer update made at global step ``step`` (0-based).

        A pure function of the step: the phase's ``lr`` (or ``base_lr``) from the phase's
        first step, times a linear warm-up over the first ``warmup_steps`` global steps.
        The same on every process and after any resume, so no scheduler state exists.
        """
        phase = self.at(step).phase
        lr = phase.lr if phase.lr is not None else base_lr
        if warmup_steps > 0:
            lr *= min(1.0, (step + 1) / warmup_steps)
        return lr
