"""A tiny FLUX model set in diffusers' folder layout, for the trainer's smoke runs and tests.

``build_tiny_flux_folder(root)`` writes ``transformer/``, ``vae/``, ``text_encoder/`` (CLIP),
``text_encoder_2/`` (T5), ``tokenizer/`` and ``tokenizer_2/`` exactly as a downloaded
FLUX.1-dev folder has them, with random weights and word-level tokenizers built offline
(nothing can be downloaded). Everything is small enough to train on a CPU in seconds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..offline import settle_bitsandbytes

logger = logging.getLogger(__name__)

TINY_HIDDEN = 128  # 2 heads of 64
TINY_TEXT_DIM = 32
_WORDS = (
    "a an the one two three four people person man woman friends photo of at on in with and smiling "
    "party beach park portrait group standing sitting looking camera outdoors indoors happy together"
).split()
_VERSION = "1"


def _word_tokenizer(max_length: int, bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "[EOS]": 3}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    single = "[BOS] $A [EOS]" if bos else "$A [EOS]"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=max_length,
    )
    fast.do_lower_case = True
    return fast, len(vocab)


def flux_transformer_config(
    num_layers: int = 1, num_single_layers: int = 1, num_heads: int = TINY_HIDDEN // 64, text_dim: int = TINY_TEXT_DIM
) -> dict:
    """A diffusers ``FluxTransformer2DModel`` config of FLUX.1's shape at test size: 64 latent channels, heads
    64 wide, RoPE axes 16 + 24 + 24, guidance embedding; ``text_dim`` for both the T5 and the pooled CLIP input."""
    return dict(
        patch_size=1,
        in_channels=64,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=64,
        num_attention_heads=num_heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        guidance_embeds=True,
        axes_dims_rope=(16, 24, 24),
    )


def build_tiny_flux_folder(root: str | Path, seed: int = 0) -> Path:
    """Write the tiny diffusers FLUX folder under ``root`` once; returns its path."""
    settle_bitsandbytes()  # before diffusers, which imports peft and bitsandbytes
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = Path(root)
    marker = root / "tiny_flux.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == _VERSION:
        return root
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    FluxTransformer2DModel(**flux_transformer_config()).save_pretrained(root / "transformer")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).save_pretrained(root / "vae")
    clip_tok, vocab = _word_tokenizer(77, bos=True)
    clip_tok.save_pretrained(root / "tokenizer")
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=TINY_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=TINY_TEXT_DIM,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        )
    ).save_pretrained(root / "text_encoder")
    t5_tok, vocab = _word_tokenizer(32, bos=False)
    t5_tok.save_pretrained(root / "tokenizer_2")
    T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=TINY_TEXT_DIM,
            d_kv=16,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=3,
        )
    ).save_pretrained(root / "text_encoder_2")
    marker.write_text(json.dumps({"version": _VERSION, "hidden": TINY_HIDDEN}))
    logger.info("built the tiny FLUX model set in %s", root)
    return root
