"""The MultiID-Bench folder layout: one folder per sample.

    <sample>/out.jpg      the generated image
    <sample>/ori.jpg      the ground-truth photo
    <sample>/ref_1.jpg .. ref_4.jpg   one reference photo per person, in person order
                          (the authors' inference script writes ref_0.jpg .. ref_3.jpg: accepted too)
    <sample>/meta.json    {"prompt": ..., optional "bboxes": [[x1, y1, x2, y2], ...] in ori.jpg pixels}

``.png``, ``.jpeg`` and ``.webp`` are accepted for every image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_PERSONS = 4


def find_image(folder: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = folder / (stem + suffix)
        if path.is_file():
            return path
    return None


@dataclass
class Sample:
    folder: Path
    refs: list[Path]
    ground_truth: Path | None
    output: Path | None
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def persons(self) -> int:
        return len(self.refs)

    @property
    def prompt(self) -> str:
        return str(self.meta.get("prompt") or self.meta.get("caption_en") or "")

    @property
    def subset(self) -> str:
        return "single" if self.persons == 1 else "multi"


def reference_paths(folder: Path) -> list[Path]:
    """ref_1, ref_2, .. in order; the authors' 0-based ref_0, ref_1, .. when ref_0 exists."""
    first = 0 if find_image(folder, "ref_0") is not None else 1
    refs = []
    for k in range(first, first + MAX_PERSONS):
        path = find_image(folder, f"ref_{k}")
        if path is None:
            break
        refs.append(path)
    return refs


def read_sample(folder: Path, output_stem: str = "out") -> Sample:
    folder = Path(folder)
    meta = {}
    if (folder / "meta.json").is_file():
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{folder.name}/meta.json is not valid JSON ({exc})") from exc
    return Sample(folder, reference_paths(folder), find_image(folder, "ori"), find_image(folder, output_stem), meta)


def list_samples(root: Path, output_stem: str = "out") -> list[Sample]:
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"{root} is not a folder")
    samples = [read_sample(p, output_stem) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    samples = [s for s in samples if s.refs or s.output or s.ground_truth]
    if not samples:
        raise SystemExit(f"{root} holds no sample folders (expected <sample>/out.jpg, ori.jpg, ref_1.jpg, meta.json)")
    return samples
