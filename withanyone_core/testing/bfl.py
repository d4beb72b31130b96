"""Names and shapes of FLUX checkpoints in Black Forest Labs' layout, for building test models."""

from __future__ import annotations


def bfl_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a BFL-layout FLUX plus the WithAnyone adapter for ``cfg``."""
    d, mlp = cfg["hidden_size"], int(cfg["hidden_size"] * cfg["mlp_ratio"])
    head = d // cfg["num_heads"]
    inner = 64 * cfg["num_heads"]
    shapes: dict[str, tuple[int, ...]] = {}

    def lin(name, n_in, n_out, bias=True):
        shapes[name + ".weight"] = (n_out, n_in)
        if bias:
            shapes[name + ".bias"] = (n_out,)

    lin("img_in", cfg["in_channels"], d)
    lin("txt_in", cfg["context_in_dim"], d)
    for emb, n_in in (("time_in", 256), ("vector_in", cfg["vec_in_dim"]), ("guidance_in", 256)):
        lin(emb + ".in_layer", n_in, d)
        lin(emb + ".out_layer", d, d)
    for i in range(cfg["depth"]):
        p = f"double_blocks.{i}."
        for s in ("img", "txt"):
            lin(p + f"{s}_mod.lin", d, 6 * d)
            lin(p + f"{s}_attn.qkv", d, 3 * d, bias=cfg["qkv_bias"])
            lin(p + f"{s}_attn.proj", d, d)
            shapes[p + f"{s}_attn.norm.query_norm.scale"] = (head,)
            shapes[p + f"{s}_attn.norm.key_norm.scale"] = (head,)
            lin(p + f"{s}_mlp.0", d, mlp)
            lin(p + f"{s}_mlp.2", mlp, d)
    for i in range(cfg["depth_single_blocks"]):
        p = f"single_blocks.{i}."
        lin(p + "modulation.lin", d, 3 * d)
        lin(p + "linear1", d, 3 * d + mlp)
        lin(p + "linear2", d + mlp, d)
        shapes[p + "norm.query_norm.scale"] = (head,)
        shapes[p + "norm.key_norm.scale"] = (head,)
    lin("final_layer.linear", d, cfg["in_channels"])
    lin("final_layer.adaLN_modulation.1", d, 2 * d)
    for branch in ("ipa_arc", "ipa_sig"):
        for i in range(cfg["depth"] + cfg["depth_single_blocks"]):
            p = f"{branch}.{i}."
            for norm in ("norm1", "norm2"):
                shapes[p + norm + ".weight"] = (d,)
                shapes[p + norm + ".bias"] = (d,)
            lin(p + "to_q", d, inner, bias=False)
            lin(p + "to_kv", d, 2 * inner, bias=False)
            lin(p + "to_out", inner, d, bias=False)
    for proj, n_in, hid, out in (
        ("arcface_in_arc", 512, 4 * d, 8 * d),
        ("arcface_in_sig", 512, 4 * d, 8 * d),
        ("siglip_in_sig", 768, d, d),
    ):
        lin(proj + ".0", n_in, hid)
        shapes[proj + ".2.weight"] = (hid,)
        shapes[proj + ".2.bias"] = (hid,)
        lin(proj + ".3", hid, out)
    return shapes
