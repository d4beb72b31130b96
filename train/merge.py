"""Merge separately trained adapter branches into one ``withanyone.safetensors``.

    python train/merge.py --arcface RUN_A/checkpoints/step-N/withanyone.safetensors \
        --siglip RUN_S/checkpoints/step-M/withanyone.safetensors --out withanyone.safetensors

The authors train the ArcFace branch and the SigLIP branch in separate runs and merge
them (their ``merge_ipa.py``); the configs here do the same (``train.branch``). The
ArcFace branch (``ipa_arc.*``, ``arcface_in_arc.*``) is taken from ``--arcface``, the
SigLIP branch (``ipa_sig.*``, ``arcface_in_sig.*``, ``siglip_in_sig.*``) from
``--siglip``. Each input may be a checkpoint of this trainer (official key layout) or a
single-branch file in the authors' training layout (``ipa.N.*``, ``arcface_in.*``,
``siglip_in.*``, possibly next to FLUX weights). The result loads in the ComfyUI
adapter loader.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

if __name__ == "__main__" and not __package__:  # python train/merge.py
    import _script

    _script.run_as_module("merge")

from train.models import BRANCH_PREFIXES  # noqa: E402
from withanyone_core.checkpoints.adapter_files import load_adapter, save_adapter  # noqa: E402
from withanyone_core.checkpoints.reading import (  # noqa: E402
    load_safetensors,
    read_safetensors_metadata,
    strip_wrapper_prefixes,
)

logger = logging.getLogger("withanyone.merge")

# the authors' single-branch training keys -> official keys, per branch
_AUTHORS_LAYOUT = {
    "arcface": {"ipa.": "ipa_arc.", "arcface_in.": "arcface_in_arc."},
    "siglip": {"ipa.": "ipa_sig.", "arcface_in.": "arcface_in_sig.", "siglip_in.": "siglip_in_sig."},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class MergeError(ValueError):
    """Inputs that cannot be merged; the message names the file and what is wrong."""


def branch_tensors(path: str | Path, branch: str) -> dict[str, torch.Tensor]:
    """The ``branch`` tensors of ``path`` under their official names."""
    path = Path(path)
    state = strip_wrapper_prefixes(load_safetensors(path))
    trained = read_safetensors_metadata(path).get("branch")
    if trained not in (None, branch, "both"):
        raise MergeError(f"{path} was trained as the {trained} branch; pass it as --{trained}")
    prefixes = BRANCH_PREFIXES[branch]
    official = {k: v for k, v in state.items() if k.startswith(prefixes)}
    if official:
        return official
    renamed = {}
    for key, value in state.items():
        for old, new in _AUTHORS_LAYOUT[branch].items():
            if key.startswith(old):
                renamed[new + key[len(old) :]] = value
    if not renamed:
        raise MergeError(
            f"{path} holds no {branch} branch: expected keys starting with "
            f"{', '.join(prefixes)} (or the authors' {', '.join(_AUTHORS_LAYOUT[branch])})"
        )
    return renamed


def merge(arcface: str | Path, siglip: str | Path, out: str | Path, dtype: str = "bf16") -> Path:
    state = {**branch_tensors(arcface, "arcface"), **branch_tensors(siglip, "siglip")}
    blocks = {}
    for source in (arcface, siglip):
        value = read_safetensors_metadata(source).get("num_double_blocks")
        if value is not None:
            blocks[source] = int(value)
    if len(set(blocks.values())) > 1:
        raise MergeError(f"the inputs are for different FLUX models (double blocks {blocks})")
    try:  # checks every key and shape of the full adapter
        adapter = load_adapter(state, num_double_blocks=next(iter(blocks.values()), None), dtype=DTYPES[dtype])
    except ValueError as exc:
        raise MergeError(f"the two branches do not form one adapter: {exc}") from exc
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_adapter(
        adapter,
        tmp,
        metadata={"branch": "both", "merged_arcface": Path(arcface).name, "merged_siglip": Path(siglip).name},
    )
    tmp.replace(out)
    logger.info("merged %s (ArcFace branch) and %s (SigLIP branch) into %s", arcface, siglip, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arcface", required=True, type=Path, help="checkpoint holding the trained ArcFace branch")
    parser.add_argument("--siglip", required=True, type=Path, help="checkpoint holding the trained SigLIP branch")
    parser.add_argument("--out", required=True, type=Path, help="the merged withanyone.safetensors")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bf16",
        help="storage dtype of the merged file (the released one is bf16)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for flag in ("arcface", "siglip"):
        if not getattr(args, flag).is_file():
            parser.error(f"--{flag} {getattr(args, flag)} does not exist")
    try:
        return merge(args.arcface, args.siglip, args.out, args.dtype)
    except MergeError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
