#!/usr/bin/env python3
"""Writes tiny Hugging Face chat model directories, with their own tokenizer and chat template,
for `tests/it/hf_models.rs`: kaiwa must build the same prompt token ids as `transformers`'
`apply_chat_template` and decode them to the same text, and greedy generation must pick the same
tokens.

Three kinds of directory, in the layouts the models people fine-tune ship:

- `chat_smollm2`: a Llama with a byte-level BPE tokenizer (GPT-2 style, like SmolLM2's) and a
  ChatML template that injects a default system prompt, kept in `tokenizer_config.json`'s
  `chat_template` (the layout of transformers 4 saves);
- `chat_qwen2`: a Qwen2 (q/k/v biases) with Qwen2.5's kind of template (tools branch, default
  system prompt, `namespace`-free loop look-behind), kept in `chat_template.jinja` (the layout
  of transformers 5 saves);
- `chat_tinyllama`: a Llama with a SentencePiece-style BPE tokenizer (`▁` for spaces, byte
  fallback for characters outside the vocabulary, like Llama 2's and TinyLlama's) and the
  Zephyr template TinyLlama-Chat uses (`eos_token` inside the template).

The tokenizers are trained here with `tokenizers` on sentences of the repository's starter
corpus (`data/starter/tanaka_ja_en.tsv.gz`, the Tanaka corpus, CC BY 2.0 FR); the templates are
written out below in the form those models publish. Weights are random from a fixed seed.

Made with transformers 5.25.0, tokenizers 0.23.3 and torch 2.15.0. To regenerate:

    python3 -m pip install torch transformers tokenizers safetensors
    python3 tests/data/hf/make_chat_fixtures.py
"""

import gzip
import json
import shutil
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
from make_fixtures import fresh, randomize  # the same random weights and clean directories
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SEED = 40

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

QWEN2_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)

# The conversations every fixture renders: English and Japanese, with and without a system
# prompt, several turns, characters the tokenizers never saw (byte fallback), spaces and
# newlines at the edges.
CONVERSATIONS = [
    [{"role": "user", "content": "今日の天気はどうですか？"}],
    [{"role": "user", "content": "What is the weather like today?"}],
    [
        {"role": "system", "content": "You are a friendly bot. 丁寧に答えてください。"},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "  Tell me about 鬱蒼 forests 🌲\nplease.  "},
    ],
    [
        {"role": "user", "content": "おはよう"},
        {"role": "assistant", "content": "おはようございます。よく眠れましたか？"},
        {"role": "user", "content": "はい、ぐっすり。"},
    ],
]


def sentences(limit):
    """Japanese and English sentences of the starter corpus."""
    out = []
    with gzip.open(REPO / "data/starter/tanaka_ja_en.tsv.gz", "rt", encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            out.extend(c for c in cols[:2] if c)
            if len(out) >= limit:
                break
    return out


def byte_level_tokenizer(texts, specials):
    """A byte-level BPE like GPT-2's, SmolLM2's and Qwen2's."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def sentencepiece_tokenizer(texts):
    """A SentencePiece-style BPE like Llama 2's and TinyLlama's: `▁` for spaces, a `▁` before
    the text, and byte tokens `<0x00>`…`<0xFF>` for what the vocabulary lacks."""
    specials = ["<unk>", "<s>", "</s>"]
    prep = tokenizers.Tokenizer(models.BPE())
    prep.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    prep.pre_tokenizer = pre_tokenizers.Split("\n", "isolated")
    trainer = trainers.BpeTrainer(vocab_size=500, show_progress=False, limit_alphabet=200)
    prep.train_from_iterator(texts, trainer)
    trained = json.loads(prep.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(
        [tokenizers.AddedToken(s, special=True, normalized=False) for s in specials]
    )
    # Zephyr's role markers are ordinary text to this tokenizer, as in TinyLlama's.
    return tok


def fixture(name, cls, config_cls, raw, template, bos, eos, seed, template_in_config):
    out = fresh(name)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=bos, eos_token=eos, chat_template=template
    )
    vocab = len(fast)
    config = config_cls(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=fast.convert_tokens_to_ids(bos) if bos else None,
        eos_token_id=fast.convert_tokens_to_ids(eos),
        tie_word_embeddings=True,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize(model, seed)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    if template_in_config:
        # transformers 4's layout: the template inside tokenizer_config.json.
        jinja = out / "chat_template.jinja"
        tc = json.loads((out / "tokenizer_config.json").read_text())
        tc["chat_template"] = jinja.read_text() if jinja.exists() else template
        jinja.unlink(missing_ok=True)
        (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    else:
        assert (out / "chat_template.jinja").is_file(), name

    # What transformers makes of the directory as saved.
    tok = transformers.AutoTokenizer.from_pretrained(out)
    loaded = cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    cases = []
    for messages in CONVERSATIONS:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        assert ids == tok.encode(text, add_special_tokens=False), name
        with torch.no_grad():
            generated = loaded.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=6,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(ids):].tolist()
        cases.append(
            {
                "messages": messages,
                "text": text,
                "ids": ids,
                "decoded": tok.decode(ids),
                "greedy": generated,
            }
        )
    reference = {
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
        "cases": cases,
    }
    (out / "chat_reference.json").write_text(
        json.dumps(reference, ensure_ascii=False, indent=1) + "\n"
    )
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size < 400_000, (name, size)
    print(f"{name}: vocab {vocab}, {size} bytes")


def main():
    torch.set_num_threads(1)
    texts = sentences(6000)
    chatml = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    fixture(
        "chat_smollm2",
        LlamaForCausalLM,
        LlamaConfig,
        byte_level_tokenizer(texts, chatml),
        SMOLLM2_TEMPLATE,
        "<|im_start|>",
        "<|im_end|>",
        SEED + 1,
        template_in_config=True,
    )
    fixture(
        "chat_qwen2",
        Qwen2ForCausalLM,
        Qwen2Config,
        byte_level_tokenizer(texts, chatml),
        QWEN2_TEMPLATE,
        None,
        "<|im_end|>",
        SEED + 2,
        template_in_config=False,
    )
    fixture(
        "chat_tinyllama",
        LlamaForCausalLM,
        LlamaConfig,
        sentencepiece_tokenizer(texts),
        ZEPHYR_TEMPLATE,
        "<s>",
        "</s>",
        SEED + 3,
        template_in_config=False,
    )


if __name__ == "__main__":
    main()
