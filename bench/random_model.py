#!/usr/bin/env python3
"""A random Llama model directory (config.json + model.safetensors, Hugging Face names) for the
benchmarks, with numpy only: weights ~ N(0, 0.02), norm gains 1, tied embeddings.

The default shape is SmolLM2-135M's (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads,
vocab 49152, rope_theta 100000, rms eps 1e-5, context 2048). No tokenizer: the benchmarks feed ids.
Only for bench/llama_cpp.py until `kaiwa init-model` has a preset of that shape.

usage: python3 bench/random_model.py OUT_DIR [--seed 0] [--hidden 576 ...]
"""
import argparse
import json
import os
import struct

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--rope-theta", type=float, default=100000.0)
    a = ap.parse_args()

    head_dim = a.hidden // a.heads
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": a.vocab,
        "hidden_size": a.hidden,
        "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": a.context,
        "rms_norm_eps": 1e-5,
        "rope_theta": a.rope_theta,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
    }
    shapes = {"model.embed_tokens.weight": [a.vocab, a.hidden]}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = [a.hidden]
        shapes[p + "self_attn.q_proj.weight"] = [a.heads * head_dim, a.hidden]
        shapes[p + "self_attn.k_proj.weight"] = [a.kv_heads * head_dim, a.hidden]
        shapes[p + "self_attn.v_proj.weight"] = [a.kv_heads * head_dim, a.hidden]
        shapes[p + "self_attn.o_proj.weight"] = [a.hidden, a.heads * head_dim]
        shapes[p + "post_attention_layernorm.weight"] = [a.hidden]
        shapes[p + "mlp.gate_proj.weight"] = [a.intermediate, a.hidden]
        shapes[p + "mlp.up_proj.weight"] = [a.intermediate, a.hidden]
        shapes[p + "mlp.down_proj.weight"] = [a.hidden, a.intermediate]
    shapes["model.norm.weight"] = [a.hidden]

    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)

    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    with open(os.path.join(a.out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape in shapes.items():
            if len(shape) == 1:
                t = np.ones(shape, dtype=np.float32)
            else:
                t = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            f.write(t.astype("<f4").tobytes())
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    print(f"wrote {a.out}: {n_params / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
