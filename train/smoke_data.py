"""Everything ``train/configs/smoke.yaml`` needs, built offline with random weights.

    python -m train.smoke_data .cache/smoke      (or: make train-smoke)

Writes ``tiny-flux/`` (diffusers FLUX folder), ``insightface/models/antelopev2/``,
``siglip/`` and ``data/`` (photos of four synthetic people, one or two per photo, with
captions, prepared by train/prepare.py into manifest.jsonl + negatives.safetensors), and
the same photos as MultiID-2M-layout shards in ``multiid2m/train/`` (landmark cache in
``multiid2m/landmarks/``).
Idempotent: parts already there are kept.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from PIL import Image

from withanyone_core.testing.faces import build_tiny_antelopev2, make_face_image
from withanyone_core.testing.siglip import build_tiny_siglip
from withanyone_core.testing.tiny_train import build_tiny_flux_folder

logger = logging.getLogger(__name__)

PEOPLE = ("ann", "bob", "cid", "dee")
_CAPTIONS = ("two people smiling at a party", "a portrait of one person outdoors", "two friends on a beach")


def build_photos(folder: Path) -> None:
    """Per-person subfolders (one face each) plus group photos of two people at the top level."""
    folder.mkdir(parents=True, exist_ok=True)
    for p, person in enumerate(PEOPLE):
        (folder / person).mkdir(exist_ok=True)
        for k in range(3):
            image, _, _ = make_face_image([(7 + 2 * k, 6 + k)], identities=[p], seed=10 * p + k)
            Image.fromarray(image).save(folder / person / f"{k}.png")
            (folder / person / f"{k}.txt").write_text(_CAPTIONS[1])
    for g in range(6):
        a, b = g % 4, (g + 1) % 4
        image, _, _ = make_face_image([(5, 7), (13, 8)], identities=[a, b], seed=100 + g)
        Image.fromarray(image).save(folder / f"group_{g}.png")
        (folder / f"group_{g}.txt").write_text(_CAPTIONS[g % 2 * 2])


def build_smoke_set(root: str | Path) -> Path:
    root = Path(root)
    build_tiny_flux_folder(root / "tiny-flux")
    if not (root / "insightface" / "models" / "antelopev2" / "glintr100.onnx").is_file():
        build_tiny_antelopev2(root / "insightface")
    if not (root / "siglip" / "config.json").is_file():
        build_tiny_siglip(root / "siglip")
    data = root / "data"
    if not (data / "manifest.jsonl").is_file():
        from train import prepare

        build_photos(root / "photos")
        prepare.main(
            [
                "--images",
                str(root / "photos"),
                "--out",
                str(data),
                "--antelopev2",
                str(root / "insightface"),
                "--providers",
                "cpu",
            ]
        )
    shards = root / "multiid2m" / "train"
    if not (shards / "re_000000.tar").is_file():
        from train.data import Manifest
        from train.data.multiid2m.write import write_manifest_shards

        # the same photos in MultiID-2M's released layout (smoke-multiid2m.yaml), 4 photos a shard
        write_manifest_shards(
            Manifest.load(data / "manifest.jsonl"), shards, per_shard=4, landmark_dir=root / "multiid2m" / "landmarks"
        )
    logger.info("smoke set ready in %s", root)
    return root


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, nargs="?", default=Path(".cache/smoke"))
    build_smoke_set(parser.parse_args().root)


if __name__ == "__main__":
    main()
