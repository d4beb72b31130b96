"""An independent re-statement of the reference WithAnyone model, for tests and benchmarks.

Written from the reference's published semantics, deliberately in its style: BFL-layout
FLUX (fused qkv, RMSNorm ``scale``), identity cross-attention over *all* image tokens with
a dense ``[B, heads, L, n * id_len]`` boolean mask built by Python loops over heads and
tokens. It shares no code with ``withanyone_core``; it is checked against the authors'
golden outputs (tests/core/test_reference_model.py) and then used to produce golden data of
the same format for situations the shipped data lacks (batch > 1, 3-4 persons,
overlapping/fractional/outside boxes, other resolutions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------- masks
def reference_mask(batch_boxes, height, width, id_len, num_heads, num_ids=None):
    """The reference's loop-built mask: ``[B, heads, L, n * id_len]`` bool."""
    cols, rows = (width // 8) // 2, (height // 8) // 2
    num_ids = num_ids if num_ids is not None else len(batch_boxes[0])
    mask = torch.zeros(len(batch_boxes), num_heads, rows * cols, num_ids * id_len, dtype=torch.bool)
    for b, boxes in enumerate(batch_boxes):
        for person, (x1, y1, x2, y2) in enumerate(boxes[:num_ids]):
            c0 = max(0, int(x1) // 16)
            r0 = max(0, int(y1) // 16)
            c1 = min(cols, math.ceil(x2 / 16))
            r1 = min(rows, math.ceil(y2 / 16))
            tokens = [r * cols + c for r in range(r0, r1) for c in range(c0, c1)]
            for h in range(num_heads):
                for idx in tokens:
                    mask[b, h, idx, person * id_len : (person + 1) * id_len] = True
    return mask


# ------------------------------------------------------------------------- FLUX parts
def _linear(sd, name, x):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def _rms(x, scale):
    rrms = torch.rsqrt(torch.mean(x.float() ** 2, dim=-1, keepdim=True) + 1e-6)
    return (x.float() * rrms * scale.float()).to(x.dtype)


def _layer_norm(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _rope(pos, dim, theta):
    scale = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    omega = 1.0 / (theta**scale)
    out = torch.einsum("...n,d->...nd", pos.double(), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def _pos_embed(ids, axes_dim, theta):
    emb = torch.cat([_rope(ids[..., i], axes_dim[i], theta) for i in range(ids.shape[-1])], dim=-3)
    return emb.unsqueeze(1)


def _apply_rope(x, freqs):
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def _attention(q, k, v, pe):
    q, k = _apply_rope(q, pe), _apply_rope(k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    b, h, length, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, length, h * d)


def _timestep_embedding(t, dim=256, max_period=10000, time_factor=1000.0):
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _mlp_embed(sd, name, x):
    return _linear(sd, name + ".out_layer", F.silu(_linear(sd, name + ".in_layer", x)))


def _heads(x, heads):
    b, length, _ = x.shape
    return x.view(b, length, heads, -1).transpose(1, 2)


def _perceiver_ca(sd, name, id_tokens, img, mask, heads):
    x = F.layer_norm(id_tokens, (id_tokens.shape[-1],), sd[name + ".norm1.weight"], sd[name + ".norm1.bias"])
    lat = F.layer_norm(img, (img.shape[-1],), sd[name + ".norm2.weight"], sd[name + ".norm2.bias"])
    q = _heads(F.linear(lat, sd[name + ".to_q.weight"]), heads)
    k, v = F.linear(x, sd[name + ".to_kv.weight"]).chunk(2, dim=-1)
    out = F.scaled_dot_product_attention(q, _heads(k, heads), _heads(v, heads), attn_mask=mask)
    b, _, length, _ = out.shape
    return F.linear(out.permute(0, 2, 1, 3).reshape(b, length, -1), sd[name + ".to_out.weight"])


def _projector(sd, name, x):
    x = F.gelu(_linear(sd, name + ".0", x))
    x = F.layer_norm(x, (x.shape[-1],), sd[name + ".2.weight"], sd[name + ".2.bias"])
    return _linear(sd, name + ".3", x)


class ReferenceWithAnyone:
    """BFL FLUX + identity adapter evaluated from a state dict, reference semantics."""

    def __init__(self, state: dict[str, Tensor], config: dict):
        self.sd = state
        self.cfg = config
        self.hidden = config["hidden_size"]
        self.heads = config["num_heads"]
        self.adapter_heads = self.sd["ipa_arc.0.to_q.weight"].shape[0] // 64 if "ipa_arc.0.to_q.weight" in state else 0

    def _double(self, i, img, txt, vec, pe):
        sd, p, h = self.sd, f"double_blocks.{i}.", self.heads
        im = _linear(sd, p + "img_mod.lin", F.silu(vec))[:, None, :].chunk(6, dim=-1)
        tm = _linear(sd, p + "txt_mod.lin", F.silu(vec))[:, None, :].chunk(6, dim=-1)

        def qkv(stream, x, mod):
            x = (1 + mod[1]) * _layer_norm(x) + mod[0]
            q, k, v = _linear(sd, p + f"{stream}_attn.qkv", x).chunk(3, dim=-1)
            q, k, v = _heads(q, h), _heads(k, h), _heads(v, h)
            q = _rms(q, sd[p + f"{stream}_attn.norm.query_norm.scale"])
            k = _rms(k, sd[p + f"{stream}_attn.norm.key_norm.scale"])
            return q.to(v), k.to(v), v

        iq, ik, iv = qkv("img", img, im)
        tq, tk, tv = qkv("txt", txt, tm)
        attn = _attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), pe)
        t_attn, i_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        def mlp(stream, x):
            x = F.gelu(_linear(sd, p + f"{stream}_mlp.0", x), approximate="tanh")
            return _linear(sd, p + f"{stream}_mlp.2", x)

        img = img + im[2] * _linear(sd, p + "img_attn.proj", i_attn)
        img = img + im[5] * mlp("img", (1 + im[4]) * _layer_norm(img) + im[3])
        txt = txt + tm[2] * _linear(sd, p + "txt_attn.proj", t_attn)
        txt = txt + tm[5] * mlp("txt", (1 + tm[4]) * _layer_norm(txt) + tm[3])
        return img, txt

    def _single(self, i, x, vec, pe):
        sd, p, h = self.sd, f"single_blocks.{i}.", self.heads
        shift, scale, gate = _linear(sd, p + "modulation.lin", F.silu(vec))[:, None, :].chunk(3, dim=-1)
        x_mod = (1 + scale) * _layer_norm(x) + shift
        mlp_hidden = sd[p + "linear1.weight"].shape[0] - 3 * self.hidden
        qkv, mlp = torch.split(_linear(sd, p + "linear1", x_mod), [3 * self.hidden, mlp_hidden], dim=-1)
        q, k, v = (_heads(t, h) for t in qkv.chunk(3, dim=-1))
        q = _rms(q, sd[p + "norm.query_norm.scale"]).to(v)
        k = _rms(k, sd[p + "norm.key_norm.scale"]).to(v)
        attn = _attention(q, k, v, pe)
        out = _linear(sd, p + "linear2", torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=2))
        return x + gate * out

    def forward(
        self,
        img,
        txt,
        y,
        timesteps,
        guidance,
        height,
        width,
        arcface=None,
        siglip=None,
        bboxes=None,
        use_mask=True,
        id_weight=1.0,
        siglip_weight=1.0,
    ):
        sd, cfg = self.sd, self.cfg
        b = img.shape[0]
        rows, cols = height // 16, width // 16
        img_ids = torch.zeros(b, rows, cols, 3)
        img_ids[..., 1] = torch.arange(rows)[:, None]
        img_ids[..., 2] = torch.arange(cols)[None, :]
        ids = torch.cat([torch.zeros(b, txt.shape[1], 3), img_ids.reshape(b, rows * cols, 3)], dim=1)
        pe = _pos_embed(ids, cfg["axes_dim"], cfg["theta"])

        x = _linear(sd, "img_in", img)
        vec = _mlp_embed(sd, "time_in", _timestep_embedding(timesteps))
        if cfg.get("guidance_embed", True):
            vec = vec + _mlp_embed(sd, "guidance_in", _timestep_embedding(guidance))
        vec = vec + _mlp_embed(sd, "vector_in", y)
        t = _linear(sd, "txt_in", txt)

        use_ip = arcface is not None
        arc_mask = sig_mask = None
        if use_ip:
            n, hidden = arcface.shape[1], self.hidden
            arc_tok = _projector(sd, "arcface_in_arc", arcface).reshape(b, n * 8, hidden)
            sig_arc = _projector(sd, "arcface_in_sig", arcface).reshape(b, n, 8, hidden)
            sig_tok = torch.cat([_projector(sd, "siglip_in_sig", siglip), sig_arc], dim=2).reshape(b, n * 264, hidden)
            if bboxes is not None and use_mask:
                arc_mask = reference_mask(bboxes, height, width, 8, self.adapter_heads, n)
                sig_mask = reference_mask(bboxes, height, width, 264, self.adapter_heads, n)

        def identity(idx, image_tokens):
            return id_weight * _perceiver_ca(
                sd, f"ipa_arc.{idx}", arc_tok, image_tokens, arc_mask, self.adapter_heads
            ) + siglip_weight * _perceiver_ca(sd, f"ipa_sig.{idx}", sig_tok, image_tokens, sig_mask, self.adapter_heads)

        block = 0
        for i in range(cfg["depth"]):
            x, t = self._double(i, x, t, vec, pe)
            if use_ip:
                x = x + identity(block, x)
            block += 1
        text_len = t.shape[1]
        x = torch.cat([t, x], dim=1)
        for i in range(cfg["depth_single_blocks"]):
            x = self._single(i, x, vec, pe)
            if use_ip:
                txt_part, img_part = x[:, :text_len], x[:, text_len:]
                x = torch.cat([txt_part, img_part + identity(block, img_part)], dim=1)
            block += 1
        x = x[:, text_len:]
        shift, scale = _linear(sd, "final_layer.adaLN_modulation.1", F.silu(vec)).chunk(2, dim=1)
        x = (1 + scale[:, None, :]) * _layer_norm(x) + shift[:, None, :]
        return _linear(sd, "final_layer.linear", x)
