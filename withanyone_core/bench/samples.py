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
        except json.JSONDecodeError as exc:  # reported for this sample when it is scored, not for the run
            meta = {"error": f"{folder.name}/meta.json is not valid JSON ({exc})"}
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


def samples_from_index(index: Path, data_root: Path | None = None) -> list[Sample]:
    """Samples of an index file as the authors' ``hf2bench.py`` writes it (``p1.json``, ``p2.json``, ``p3.json``).

    Each entry has ``prompt``, ``image_paths`` (the references) and ``ori_img_path``, relative to
    ``data_root`` (the authors' ``--data_root``, e.g. ``p1/untar``; default: the index's folder).
    The ground truth's boxes come from ``<data_root>/<ori stem>.json`` (``bboxes``, shifted by its
    ``crop`` when there is one, as their inference script does). Sample names follow their output
    folders: the ground truth's path without suffix, ``/`` replaced by ``_``.
    """
    index = Path(index)
    root = Path(data_root) if data_root is not None else index.parent
    try:
        entries = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{index} is not a JSON index ({exc})") from None
    samples = []
    for entry in entries:
        ori = entry.get("ori_img_path")
        if not ori:
            raise SystemExit(f"{index}: an entry without ori_img_path ({str(entry)[:80]})")
        name = ori.split(".")[0].replace("/", "_")
        meta = {"prompt": entry.get("prompt", "")}
        boxes_file = root / (ori.rsplit(".", 1)[0] + ".json")
        if boxes_file.is_file():
            extra = json.loads(boxes_file.read_text())
            boxes, crop = extra.get("bboxes"), extra.get("crop")
            if isinstance(boxes, str):
                boxes = json.loads(boxes)
            if boxes and crop:
                boxes = [[b[0] - crop[0], b[1] - crop[1], b[2] - crop[0], b[3] - crop[1]] for b in boxes]
            if boxes:
                meta["bboxes"] = boxes
        refs = [root / p for p in entry.get("image_paths", [])]
        samples.append(Sample(Path(name), refs, root / ori, None, meta))
    return samples
