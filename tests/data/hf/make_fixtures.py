#!/usr/bin/env python3
"""Writes the tiny Hugging Face model directories that `tests/it/hf_models.rs` exports and runs.

Each fixture is a model directory as `transformers` saves it (`config.json` and the safetensors
weights) with random weights from a fixed seed, plus `reference.json`: the token ids of a prefill
and of a few decode steps after it, and the logits `transformers` computed for them (every
position of the prefill, then each decode step through the KV cache). kaiwa's export run through
tract must give the same logits.

Made with transformers 5.25.0 and torch 2.15.0 (CPU, float32, eager attention). To regenerate:

    python3 -m pip install torch transformers safetensors
    python3 tests/data/hf/make_fixtures.py

The fixtures are committed, so the tests need neither Python nor `transformers`. Nothing is
downloaded: every model is built from a config in this file.

`transformers` is Apache-2.0 licensed (https://github.com/huggingface/transformers); the
fixtures are random weights in its file layout, not code or weights from it.
"""

import json
import shutil
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

HERE = Path(__file__).resolve().parent
SEED = 20

# The inputs every fixture is run on: a prefill, then one token at a time through the cache.
PREFILL = [3, 17, 42, 5, 77, 60, 11]
DECODE = [29, 88, 4]

# Small enough that every fixture stays well under 300 KB.
COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


def randomize(model, seed):
    """Every parameter drawn from a fixed seed, large enough that the logits spread over several
    units (so a 1e-4 tolerance means something). Norm weights near 1 and biases away from 0, so
    a loader that dropped either would be caught (transformers starts them at 1 and 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.15 * noise)


def logits_of(model):
    """The logits of the prefill (every position) and of each decode step (with the cache)."""
    with torch.no_grad():
        ids = torch.tensor([PREFILL])
        out = model(input_ids=ids, use_cache=True)
        prefill = out.logits[0].tolist()
        cache = out.past_key_values
        decode = []
        for t in DECODE:
            out = model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            decode.append(out.logits[0, -1].tolist())
    return prefill, decode


def rounded(rows):
    return [[round(x, 6) for x in row] for row in rows]


def write_reference(out, model, note):
    prefill, decode = logits_of(model)
    reference = {
        "note": note,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "prefill_ids": PREFILL,
        "decode_ids": DECODE,
        "prefill_logits": rounded(prefill),
        "decode_logits": rounded(decode),
    }
    (out / "reference.json").write_text(json.dumps(reference) + "\n")


def fresh(name):
    out = HERE / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def build(cls, config, seed):
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize(model, seed)
    return model


def fixture(name, cls, config, seed, dtype=torch.float32, note="", **save):
    """Saves the model in `dtype`, and the reference computed in float32 by the model as
    transformers loads it back from the directory: from the weights as saved (rounded to
    `dtype`), which is what kaiwa computes after converting them exactly to f32.

    (Not the in-memory model cast back to float32: `.to(dtype)` rounds the rotary `inv_freq`
    buffer too, and that model's logits differ from the directory's, by 2.5e-4 on the Mistral
    fixture's ten positions and more at later ones.)"""
    out = fresh(name)
    model = build(cls, config, seed)
    model.to(dtype).save_pretrained(out, **save)
    loaded = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    for p in loaded.parameters():
        assert p.dtype == torch.float32, name
    if dtype == torch.float32:
        # The directory reads back in transformers as exactly the model that was saved.
        fresh_model = build(cls, config, seed)
        p0, _ = logits_of(fresh_model)
        p1, _ = logits_of(loaded)
        assert torch.allclose(torch.tensor(p0), torch.tensor(p1), atol=1e-6), name
    write_reference(out, loaded, note)
    return out


def main():
    torch.set_num_threads(1)

    # transformers 5 writes the RoPE base inside `rope_parameters`, with no top-level
    # `rope_theta`; grouped-query attention, a separate output head.
    fixture(
        "llama_rope_parameters",
        LlamaForCausalLM,
        LlamaConfig(
            **COMMON,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
        SEED + 1,
        note="Llama, rope_parameters.rope_theta 500000, GQA 4/2, untied head",
    )
    # head_dim set and not hidden_size / num_attention_heads (32 / 4 = 8); tied head.
    fixture(
        "llama_head_dim",
        LlamaForCausalLM,
        LlamaConfig(
            **COMMON,
            num_key_value_heads=4,
            head_dim=16,
            tie_word_embeddings=True,
        ),
        SEED + 2,
        note="Llama, head_dim 16 with hidden 32 and 4 heads, tied head",
    )
    # Qwen2: biases on the q, k and v projections (none on o), grouped-query attention.
    fixture(
        "qwen2",
        Qwen2ForCausalLM,
        Qwen2Config(
            **COMMON,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        SEED + 3,
        note="Qwen2, q/k/v biases, GQA 4/2",
    )
    # Mistral saved in bfloat16, with a sliding window shorter than max_position_embeddings
    # (kaiwa uses at most the window as the context, where attention is exact).
    fixture(
        "mistral_bf16",
        MistralForCausalLM,
        MistralConfig(
            **COMMON,
            num_key_value_heads=2,
            sliding_window=16,
            tie_word_embeddings=False,
        ),
        SEED + 4,
        dtype=torch.bfloat16,
        note="Mistral, bf16 weights, sliding_window 16; logits in float32 from the bf16 weights",
    )
    # Sharded: a shard size far under the model's size gives an index and several shards.
    out = fixture(
        "llama_sharded",
        LlamaForCausalLM,
        LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=False),
        SEED + 5,
        note="Llama in several safetensors shards with model.safetensors.index.json",
        max_shard_size="40KB",
    )
    shards = sorted(out.glob("model-*.safetensors"))
    assert (out / "model.safetensors.index.json").is_file() and len(shards) >= 2, shards
    assert not (out / "model.safetensors").exists()
    fixture(
        "llama_f16",
        LlamaForCausalLM,
        LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=True),
        SEED + 6,
        dtype=torch.float16,
        note="Llama, f16 weights; logits in float32 from the f16 weights",
    )

    # Refused: YaRN RoPE scaling, which kaiwa does not implement. Written the way most configs
    # on the hub carry it (transformers 4: `rope_theta` and `rope_scaling` at the top level),
    # which transformers 5 still reads as YaRN.
    out = fresh("llama_rope_scaling_yarn")
    yarn = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    model = build(
        LlamaForCausalLM,
        LlamaConfig(**COMMON, num_key_value_heads=2, rope_parameters=yarn),
        SEED + 7,
    )
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    assert AutoConfig.from_pretrained(out).rope_parameters["rope_type"] == "yarn"

    for d in sorted(HERE.iterdir()):
        if d.is_dir():
            size = sum(f.stat().st_size for f in d.iterdir())
            assert size < 300_000, (d, size)
            print(f"{d.name}: {size} bytes")


if __name__ == "__main__":
    main()
