"""Cross-checks burn-saved weights against independent implementations.

For each model directory written by `cargo run --release --bin export_check -- DIR`, loads
config.json + model.safetensors into `transformers`' LlamaForCausalLM (strict state-dict load:
every name and shape must match) and into a plain numpy forward pass, and compares both with the
logits burn computed (expected.safetensors). Prints the largest absolute difference of each.

usage: python bench/check_export.py DIR [DIR ...]
"""

import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def numpy_forward(cfg, w, tokens):
    """Llama forward in float64 numpy, written from the Hugging Face modeling code."""
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    d = h // nh
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    g = {k: v.astype(np.float64) for k, v in w.items()}

    def rms(x, gain):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * gain

    b, t = tokens.shape
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.arange(t)[:, None] * inv[None, :]
    cos = np.cos(np.concatenate([ang, ang], -1))
    sin = np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [b, heads, t, d]
        rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
        return x * cos + rot * sin

    x = g["model.embed_tokens.weight"][tokens]
    causal = np.triu(np.full((t, t), -np.inf), 1)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        y = rms(x, g[p + "input_layernorm.weight"])
        q = (y @ g[p + "self_attn.q_proj.weight"].T).reshape(b, t, nh, d).transpose(0, 2, 1, 3)
        k = (y @ g[p + "self_attn.k_proj.weight"].T).reshape(b, t, nkv, d).transpose(0, 2, 1, 3)
        v = (y @ g[p + "self_attn.v_proj.weight"].T).reshape(b, t, nkv, d).transpose(0, 2, 1, 3)
        q, k = rope(q), rope(k)
        k = np.repeat(k, nh // nkv, axis=1)
        v = np.repeat(v, nh // nkv, axis=1)
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        ctx = (s @ v).transpose(0, 2, 1, 3).reshape(b, t, h)
        x = x + ctx @ g[p + "self_attn.o_proj.weight"].T
        y = rms(x, g[p + "post_attention_layernorm.weight"])
        gate = y @ g[p + "mlp.gate_proj.weight"].T
        up = y @ g[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ g[p + "mlp.down_proj.weight"].T
    head = g.get("lm_head.weight", g["model.embed_tokens.weight"])
    return rms(x, g["model.norm.weight"]) @ head.T


def check(directory):
    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text())
    weights = load_file(directory / "model.safetensors")
    expected = load_file(directory / "expected.safetensors")
    tokens, burn_logits = expected["tokens"], expected["logits"].astype(np.float64)
    scale = np.abs(burn_logits).max()

    ref = numpy_forward(cfg, weights, tokens)
    print(f"{directory.name}: |logits| max {scale:.3f}; numpy float64 vs burn: {np.abs(ref - burn_logits).max():.2e}")

    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        print(f"  transformers check skipped: {e}")
        return
    config = LlamaConfig(**cfg)
    model = LlamaForCausalLM(config).eval()
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied model has no lm_head.weight in the file; transformers ties it to the embedding.
    missing = [m for m in missing if not (cfg["tie_word_embeddings"] and m == "lm_head.weight")]
    assert not missing and not unexpected, f"missing {missing}, unexpected {unexpected}"
    if cfg["tie_word_embeddings"]:
        model.tie_weights()
    with torch.no_grad():
        hf = model(torch.from_numpy(tokens)).logits.double().numpy()
    print(f"  transformers {__import__('transformers').__version__} float32 vs burn: {np.abs(hf - burn_logits).max():.2e}; vs numpy float64: {np.abs(hf - ref).max():.2e}")


if __name__ == "__main__":
    for d in sys.argv[1:]:
        check(d)
