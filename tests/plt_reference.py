"""A deliberately naive Parallel Loop Transformer, written from docs/design.md §2 alone.

One sequence (no padding), float64, one position and one head at a time, explicit loops everywhere. It shares
nothing with parloop's model code except the weights, so agreement with it checks the math, not the plumbing.
"""

from __future__ import annotations

import math

import torch


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    half = x.shape[-1] // 2
    out = x.clone()
    for i in range(half):
        angle = pos * theta ** (-2.0 * i / x.shape[-1])
        c, s = math.cos(angle), math.sin(angle)
        out[..., i] = x[..., i] * c - x[..., i + half] * s
        out[..., i + half] = x[..., i + half] * c + x[..., i] * s
    return out


def _softmax_attend(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    scores = torch.stack([q @ k for k in keys]) / math.sqrt(q.shape[-1])
    weights = torch.softmax(scores, dim=0)
    return sum(w * v for w, v in zip(weights, values, strict=True))


def reference_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits `[T, vocab]` of one unpadded sequence."""
    cfg = model.config
    p = {k: v.detach().double() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        p["lm_head.weight"] = p["model.embed_tokens.weight"]
    n, R, W = len(ids), cfg.plt_num_loops, cfg.plt_window_size[0]
    H, Hkv, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    theta = cfg.rope_parameters["rope_theta"]
    a = 1.0 if cfg.plt_emb_scale is None else cfg.plt_emb_scale
    b = 1.0 if cfg.plt_hidden_scale is None else cfg.plt_hidden_scale
    mode = cfg.plt_loop_mode
    E = p["model.embed_tokens.weight"][ids]
    K0: dict[int, list] = {}
    V0: dict[int, list] = {}
    prev_loop = None
    for r in range(R):
        if r == 0:
            h = E.clone()
        else:
            if mode == "parallel":
                shifted = torch.zeros_like(prev_loop)
                shifted[1:] = prev_loop[:-1]
            else:
                shifted = prev_loop
            h = a * E + b * shifted
        for i in range(cfg.num_hidden_layers):
            pre = f"model.layers.{i}."
            x = _rms(h, p[pre + "input_layernorm.weight"], eps)
            q = (x @ p[pre + "self_attn.q_proj.weight"].T).view(n, H, hd)
            k = (x @ p[pre + "self_attn.k_proj.weight"].T).view(n, Hkv, hd)
            v = (x @ p[pre + "self_attn.v_proj.weight"].T).view(n, Hkv, hd)
            q = torch.stack([_rope(q[t], t, theta) for t in range(n)])
            k = torch.stack([_rope(k[t], t, theta) for t in range(n)])
            if r == 0:
                K0[i], V0[i] = k, v
            attn = torch.zeros(n, H, hd, dtype=torch.float64)
            for t in range(n):
                for head in range(H):
                    g_kv = head // (H // Hkv)
                    qv = q[t, head]
                    if r == 0 or R == 1 or mode == "sequential":
                        attn[t, head] = _softmax_attend(qv, [k[j, g_kv] for j in range(t + 1)],
                                                        [v[j, g_kv] for j in range(t + 1)])
                        continue
                    glob = _softmax_attend(qv, [K0[i][j, g_kv] for j in range(t + 1)],
                                           [V0[i][j, g_kv] for j in range(t + 1)])
                    lo = max(0, t - W)
                    loc = _softmax_attend(qv, [k[j, g_kv] for j in range(lo, t + 1)],
                                          [v[j, g_kv] for j in range(lo, t + 1)])
                    if cfg.plt_gate_use_hidden_states:
                        gn = _rms(h[t], p[pre + "self_attn.plt_gate.gate_norm.weight"], eps)
                        z = (p[pre + "self_attn.plt_gate.weight"] @ gn)[head]
                    else:
                        z = qv @ p[pre + "self_attn.plt_gate.weight"][head]
                    g = torch.sigmoid(z + p[pre + "self_attn.plt_gate.bias"][head])
                    attn[t, head] = g * glob + (1 - g) * loc
            h = h + attn.reshape(n, H * hd) @ p[pre + "self_attn.o_proj.weight"].T
            y = _rms(h, p[pre + "post_attention_layernorm.weight"], eps)
            gate = y @ p[pre + "mlp.gate_proj.weight"].T
            up = y @ p[pre + "mlp.up_proj.weight"].T
            h = h + (torch.nn.functional.silu(gate) * up) @ p[pre + "mlp.down_proj.weight"].T
        prev_loop = _rms(h, p["model.norm.weight"], eps) if cfg.plt_normalize_per_loop else h
    return _rms(h, p["model.norm.weight"], eps) @ p["lm_head.weight"].T
