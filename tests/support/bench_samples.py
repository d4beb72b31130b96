"""MultiID-Bench sample folders for the tiny detector, shared by the metric tests of the core and of the node.

The tiny detector (withanyone_core/testing/faces.py) fires on green 32 px cells of its 640 px input, so reference
photos are 427 px crops of a 640 px canvas: the authors' 1.5x black padding makes them 640 px again, with the face
back on the detector's grid.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from withanyone_core.testing.faces import make_face_image

REF_SIDE, REF_OFFSET = 427, 106  # int(427 * 1.5) = 640; (640 - 427) // 2 = 106


def reference_photo(identity: int, seed: int) -> np.ndarray:
    canvas = make_face_image([(9, 9)], identities=[identity], seed=seed)[0]
    return canvas[REF_OFFSET : REF_OFFSET + REF_SIDE, REF_OFFSET : REF_OFFSET + REF_SIDE].copy()


def write_sample(root, name, out, truth, refs, prompt="two people", first=1):
    """One sample folder as the bench writes it: out.png, ori.png, ref_<k>.png and meta.json."""
    folder = root / name
    folder.mkdir(parents=True)
    Image.fromarray(out).save(folder / "out.png")
    Image.fromarray(truth).save(folder / "ori.png")
    for k, ref in enumerate(refs):
        Image.fromarray(ref).save(folder / f"ref_{k + first}.png")
    (folder / "meta.json").write_text(json.dumps({"prompt": prompt}))
    return folder
