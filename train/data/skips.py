"""The run's record of bad data: every skipped sample, named, counted per reason, and the stop rule.

Readers (the manifest, the MultiID-2M stream, references, cluster centres) skip a bad sample
with a warning naming it (manifest line, or shard and member) and hand the trainer a
``(where, reason, message)`` entry. :class:`SkipLedger` keeps them: the run's summary counts
them per reason, ``<output_dir>/skipped.jsonl`` lists each one, and when the share of bad
samples among those read exceeds ``data.max_bad_fraction`` the run stops with
:class:`BadDataError` listing them (checked once enough samples were read to judge, and
always at the end of the run).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

# the share is judged once this many samples were read (one bad sample among the first few is no trend)
MIN_SAMPLES_TO_JUDGE = 200
LISTED_IN_ERROR = 20


class BadDataError(RuntimeError):
    """Too many samples were bad: the message counts them per reason and lists the first ones."""


class SkipLedger:
    def __init__(
        self, max_fraction: float = 0.01, path: str | Path | None = None, min_samples: int = MIN_SAMPLES_TO_JUDGE
    ):
        self.max_fraction = float(max_fraction)
        self.path = Path(path) if path is not None else None
        self.min_samples = min_samples
        self.entries: list[tuple[str, str, str]] = []  # samples: counted against max_fraction
        self.other: list[tuple[str, str, str]] = []  # references, cluster centres: listed, not samples read
        self.read = 0  # samples read (good and bad)

    # ---- recording
    def add(self, entries: Iterable, samples: bool = True) -> None:
        """``(where, reason, message)`` entries; ``samples=False`` for things that are not training samples."""
        entries = [tuple(e) for e in entries]
        if not entries:
            return
        (self.entries if samples else self.other).extend(entries)
        if self.path is not None:
            try:
                with open(self.path, "a", encoding="utf-8") as fh:
                    for where, reason, message in entries:
                        fh.write(json.dumps({"where": where, "reason": reason, "message": message}) + "\n")
            except OSError as exc:
                logger.warning("could not list skipped samples in %s (%s)", self.path, exc)

    def seen(self, count: int) -> None:
        self.read += int(count)

    # ---- reading
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, reason, _ in self.entries + self.other:
            out[reason] = out.get(reason, 0) + 1
        return dict(sorted(out.items()))

    @property
    def fraction(self) -> float:
        return len(self.entries) / max(self.read, len(self.entries), 1)

    def summary(self) -> str:
        if not self.entries and not self.other:
            return f"no bad data skipped ({self.read} samples read)"
        reasons = ", ".join(f"{reason} {n}" for reason, n in self.counts().items())
        where = f"; each is listed in {self.path}" if self.path is not None else ""
        return (
            f"skipped {len(self.entries)} bad sample(s) of {self.read} read ({100 * self.fraction:.2f} %)"
            + (f" and {len(self.other)} bad reference/centre file(s)" if self.other else "")
            + f": {reasons}{where}"
        )

    def check(self, final: bool = False, totals: tuple[float, float] | None = None) -> None:
        """Raise :class:`BadDataError` when the bad share is above ``max_fraction`` (judged after
        ``min_samples`` samples, or at the end of the run whatever the count). ``totals``: (bad, read)
        summed over every process, so all ranks take the same decision (none waits for a stopped one)."""
        bad, read = totals if totals is not None else (len(self.entries), self.read)
        if not bad or (not final and read < self.min_samples):
            return
        if bad / max(read, bad, 1) <= self.max_fraction:
            return
        listed = "\n".join(
            f"  [{reason}] {message if where in message else f'{where}: {message}'}"
            for where, reason, message in self.entries[:LISTED_IN_ERROR]
        )
        more = f"\n  ... and {len(self.entries) - LISTED_IN_ERROR} more" if len(self.entries) > LISTED_IN_ERROR else ""
        raise BadDataError(
            f"{int(bad)} of {int(read)} samples read were bad ({100 * bad / max(read, bad, 1):.2f} %, above "
            f"data.max_bad_fraction = {100 * self.max_fraction:g} %); by reason: "
            f"{', '.join(f'{r} {n}' for r, n in self.counts().items())}."
            f" Fix or remove them (or raise data.max_bad_fraction to train on the rest):\n{listed}{more}"
        )
