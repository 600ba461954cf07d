"""An independent float64 NumPy implementation of the Lens MMDiT equations (LENS_SPEC §2).

It reads an *official-layout* state dict (PyTorch names and [out, in] shapes) and follows the spec
text directly, sharing no code with lens_jax: per-sample loops, explicit complex RoPE, additive mask.
"""
import numpy as np


def _lin(sd, name, x):
    w = sd[name + ".weight"].astype(np.float64)
    y = x @ w.T
    b = sd.get(name + ".bias")
    return y if b is None else y + b.astype(np.float64)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(np.float64)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _rope_complex(positions, axes_dims, theta):
    """e^{i * p_a * omega_(a,j)} per token: [T, sum(d_a)/2] complex."""
    out = []
    for a, d in enumerate(axes_dims):
        j = np.arange(d // 2)
        omega = theta ** (-2.0 * j / d)
        out.append(np.exp(1j * positions[:, a:a + 1] * omega[None, :]))
    return np.concatenate(out, axis=1)


def _apply_rope(x, rot):
    """x [T, H, Dh] real; pairs (2m, 2m+1) as complex numbers multiplied by rot [T, Dh/2]."""
    xc = x[..., 0::2] + 1j * x[..., 1::2]
    y = xc * rot[:, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = y.real
    out[..., 1::2] = y.imag
    return out


def reference_forward(sd, cfg, x, sigma, context, mask, n_layers_text=4):
    """Official call convention: x [B,128,h,w], sigma [B], context [B,S,4E], mask [B,S] -> [B,128,h,w]."""
    heads, dh = cfg["num_heads"], cfg["head_dim"]
    d = heads * dh
    B, C, h, w = x.shape
    out = np.zeros((B, C, h, w))
    for b in range(B):
        img = x[b].reshape(C, h * w).T.astype(np.float64)                  # row-major tokens
        ctx = context[b].astype(np.float64)
        e = ctx.shape[-1] // n_layers_text
        txt = np.concatenate([_rms(ctx[:, i * e:(i + 1) * e], sd[f"txt_norm.{i}.weight"], 1e-5)
                              for i in range(n_layers_text)], axis=-1)
        img = _lin(sd, "img_in", img)
        txt = _lin(sd, "txt_in", txt)
        # Timestep: cos half first, 1000 * sigma inside.
        half = cfg["timestep_dim"] // 2
        f = np.exp(-np.log(10000.0) * np.arange(half) / half)
        arg = 1000.0 * float(sigma[b]) * f
        temb = _lin(sd, "time_text_embed.timestep_embedder.linear_2",
                    _silu(_lin(sd, "time_text_embed.timestep_embedder.linear_1", np.concatenate([np.cos(arg), np.sin(arg)]))))
        # Positions.
        rows = np.arange(h) - (h - h // 2)
        cols = np.arange(w) - (w - w // 2)
        ipos = np.array([[0, r, c] for r in rows for c in cols], np.float64)
        s = ctx.shape[0]
        start = max(h // 2, w // 2)
        tpos = np.array([[start + k] * 3 for k in range(s)], np.float64)
        rot_i = _rope_complex(ipos, cfg["rope_axes"], 10000.0)
        rot_t = _rope_complex(tpos, cfg["rope_axes"], 10000.0)
        addmask = np.concatenate([np.zeros(h * w), np.where(mask[b], 0.0, -np.inf)])
        for layer in range(cfg["num_layers"]):
            p = f"transformer_blocks.{layer}."
            mi = _lin(sd, p + "img_mod.1", _silu(temb)).reshape(6, d)
            mt = _lin(sd, p + "txt_mod.1", _silu(temb)).reshape(6, d)
            xi = _rms(img, sd[p + "img_norm1.weight"], 1e-6) * (1 + mi[1]) + mi[0]
            xt = _rms(txt, sd[p + "txt_norm1.weight"], 1e-6) * (1 + mt[1]) + mt[0]

            def qkv(xs, name, nq, nk, rot):
                t = _lin(sd, p + "attn." + name, xs).reshape(-1, 3, heads, dh)
                q = _rms(t[:, 0], sd[p + "attn." + nq + ".weight"], 1e-5)
                k = _rms(t[:, 1], sd[p + "attn." + nk + ".weight"], 1e-5)
                return _apply_rope(q, rot), _apply_rope(k, rot), t[:, 2]

            qi, ki, vi = qkv(xi, "img_qkv", "norm_q", "norm_k", rot_i)
            qt, kt, vt = qkv(xt, "txt_qkv", "norm_added_q", "norm_added_k", rot_t)
            q = np.concatenate([qi, qt]); k = np.concatenate([ki, kt]); v = np.concatenate([vi, vt])
            att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dh) + addmask[None, None, :]
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = np.einsum("hqk,khd->qhd", att, v).reshape(-1, d)
            ai = _lin(sd, p + "attn.to_out.0", o[:h * w])
            at = _lin(sd, p + "attn.to_add_out", o[h * w:])
            img = img + mi[2] * ai
            txt = txt + mt[2] * at

            def mlp(xs, name):
                return _lin(sd, name + ".w2", _silu(_lin(sd, name + ".w1", xs)) * _lin(sd, name + ".w3", xs))

            img = img + mi[5] * mlp(_rms(img, sd[p + "img_norm2.weight"], 1e-6) * (1 + mi[4]) + mi[3], p + "img_mlp")
            txt = txt + mt[5] * mlp(_rms(txt, sd[p + "txt_norm2.weight"], 1e-6) * (1 + mt[4]) + mt[3], p + "txt_mlp")
        mod = _lin(sd, "norm_out.linear", _silu(temb))
        scale, shift = mod[:d], mod[d:]
        mu = img.mean(-1, keepdims=True)
        var = ((img - mu) ** 2).mean(-1, keepdims=True)
        y = (img - mu) / np.sqrt(var + 1e-6) * (1 + scale) + shift
        y = _lin(sd, "proj_out", y)
        out[b] = y.T.reshape(C, h, w)
    return out
