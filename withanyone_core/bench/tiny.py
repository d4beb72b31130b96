"""Random-weight stand-ins in the real file formats of the quality metrics (for tests and smoke runs).

- :func:`build_tiny_clip`: a Hugging Face CLIP folder (config.json, model.safetensors,
  preprocessor_config.json, a byte-level tokenizer: vocab.json, merges.txt, tokenizer.json).
- :func:`build_tiny_aesthetic`: a SigLIP vision folder and an aesthetic v2.5 head safetensors.
- :func:`build_random_inception`: InceptionV3 weights (pytorch-fid or torchvision layout), full size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _byte_chars() -> list[str]:
    """CLIP's byte -> printable unicode table (every byte becomes one visible character)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per character
    CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            image_size=224,
            patch_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def build_tiny_aesthetic(
    folder: str | Path, head_file: str | Path, seed: int = 0, image_size: int = 56
) -> tuple[Path, Path]:
    from safetensors.torch import save_file
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from .quality import AestheticMetric

    folder, head_file = Path(folder), Path(head_file)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
    )
    SiglipVisionModel(config).save_pretrained(folder)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    head = AestheticMetric.build_head(config.hidden_size)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(head_file))
    return folder, head_file


def build_random_inception(path: str | Path, variant: str = "fid", seed: int = 0) -> Path:
    """Full-size InceptionV3 weights with random values (BN statistics included), in the variant's key layout."""
    from safetensors.torch import save_file

    from .quality import build_inception

    torch.manual_seed(seed)
    net = build_inception(variant)
    state = {}
    for key, value in net.state_dict().items():
        value = value.clone()
        if not value.dtype.is_floating_point:
            state[key] = value
            continue
        if key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
        elif key.endswith("running_mean"):
            value.normal_(0, 0.1)
        elif value.ndim == 4:
            value.normal_(0, (2.0 / value[0].numel()) ** 0.5)
        elif value.ndim == 2:
            value.normal_(0, 0.01)
        state[key] = value.contiguous()
    path = Path(path)
    save_file(state, str(path))
    return path
