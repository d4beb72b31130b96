"""Values passed between WithAnyone nodes, and their ComfyUI socket types."""

from __future__ import annotations

from dataclasses import dataclass, field

from comfy_api.latest import io

ADAPTER = io.Custom("WITHANYONE_ADAPTER")
FACE_ANALYZER = io.Custom("WITHANYONE_FACE_ANALYZER")
LAYOUT = io.Custom("WITHANYONE_LAYOUT")


@dataclass(frozen=True)
class Layout:
    """Face boxes ``[x1, y1, x2, y2]`` in output pixels, one per person, in person order."""

    width: int
    height: int
    boxes: tuple[tuple[float, float, float, float], ...] = field(default_factory=tuple)

    @property
    def num_persons(self) -> int:
        return len(self.boxes)
