"""Topicality sweep: trains the default model's architecture in PyTorch on the recipe's data
(tokenized by prep.py) under several mixes, objectives, sizes and compute budgets, and measures
what the everyday suite cannot see in one sample: how often a reply carries its own prompt's
topic words against how often it carries another prompt's (chance). Research only; the product's
trainer is kaiwa's own (src/train). Written for one short run on a GPU; runs on a CPU at toy size.

    python3 sweep.py DATA.npz OUT_DIR [CONFIG ...]

Environment: BUDGET (seconds; configs that would start past it are skipped), SCALE (multiplies
every step count, for a smoke test), SAVE (comma-separated config names whose weights are saved
as fp16 safetensors under Hugging Face names).
"""

import json
import math
import os
import sys
import time
import unicodedata

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

T0 = time.time()
BUDGET = float(os.environ.get("BUDGET", "1e9"))
SCALE = float(os.environ.get("SCALE", "1"))
SAVE = set(filter(None, os.environ.get("SAVE", "").split(",")))
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BOS, EOS, CTX, VOCAB = 0, 2, 256, 8192

# The recipe (models/recipe.sh): the dialogue, the Japanese dialogue plain and under an English
# system prompt 6× each, the Japanese Tanaka sentences; 900 steps of 16 × 256 tokens.
RECIPE = [("dlg", 1), ("ja", 6), ("jasys", 6), ("tanaka", 1)]
DERIVED = RECIPE + [("rja", 1), ("ren", 1), ("xja", 8), ("xen", 4)]
SMALL = dict(d=256, ff=688, layers=4, heads=4)
BIG = dict(d=512, ff=1376, layers=8, heads=8)

# name: mix, objective, model, batch, steps, peak lr
CONFIGS = {
    "base": (RECIPE, "chat", SMALL, 16, 900, 2e-3),
    "base_x16": (RECIPE, "chat", SMALL, 64, 3600, 2e-3),
    "derived_x16": (DERIVED, "chat", SMALL, 64, 3600, 2e-3),
    "pre": (RECIPE, "pretrain", SMALL, 16, 900, 2e-3),
    "pre_x16": (RECIPE, "pretrain", SMALL, 64, 3600, 2e-3),
    "big_x16": (DERIVED, "chat", BIG, 64, 3600, 1e-3),
    "derived": (DERIVED, "chat", SMALL, 16, 900, 2e-3),
    "base_x4": (RECIPE, "chat", SMALL, 64, 900, 2e-3),
    "pre_x4": (RECIPE, "pretrain", SMALL, 64, 900, 2e-3),
    "pre_derived": (DERIVED, "pretrain", SMALL, 16, 900, 2e-3),
}


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


class Data:
    def __init__(self, path):
        z = np.load(path)
        self.src = {}
        for key in z.files:
            if key.endswith("_off"):
                name = key[:-4]
                self.src[name] = (z[name + "_ids"], z[name + "_learn"], z[key])

    def examples(self, name):
        ids, learn, off = self.src[name]
        return [(ids[off[i]:off[i + 1]], learn[off[i]:off[i + 1]]) for i in range(len(off) - 1)]

    def rows(self, mix, objective, seed):
        """kaiwa's packing: shuffled examples, cut into rows of CTX + 1 overlapping by one."""
        items = []
        for name, repeat in mix:
            items += self.examples(name) * repeat
        order = np.random.default_rng(seed).permutation(len(items))
        ids = np.concatenate([items[i][0] for i in order]).astype(np.int64)
        if objective == "pretrain":
            learn = np.concatenate([np.arange(len(items[i][0])) > 0 for i in order])
        else:
            learn = np.concatenate([items[i][1] for i in order])
        rows, masks, start = [], [], 0
        while start + 1 < len(ids):
            end = min(start + CTX + 1, len(ids))
            r = np.full(CTX + 1, EOS, dtype=np.int64)
            m = np.zeros(CTX, dtype=bool)
            r[: end - start] = ids[start:end]
            m[: end - start - 1] = learn[start + 1:end]
            if m.any():
                rows.append(r)
                masks.append(m)
            start = end - 1
        return torch.tensor(np.stack(rows)), torch.tensor(np.stack(masks))


def make_model(shape, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=shape["d"], intermediate_size=shape["ff"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"], max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=BOS, initializer_range=0.02,
    )
    return LlamaForCausalLM(config).to(DEV)


def masked_loss(model, rows, masks, per_token=False):
    x, y = rows[:, :-1].to(DEV), rows[:, 1:].to(DEV)
    m = masks.to(DEV).float()
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):
        logits = model(input_ids=x).logits
    nll = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1), reduction="none")
    nll = nll.view_as(m) * m
    if per_token:
        return nll.sum(), m.sum()
    return nll.sum() / m.sum().clamp(min=1)


def train(data, mix, objective, shape, batch, steps, lr, seed=1):
    rows, masks = data.rows(mix, objective, seed)
    model = make_model(shape, seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=DEV == "cuda",
    )
    warmup, min_lr = 30, lr / 10
    gen = torch.Generator().manual_seed(seed)
    perm, at, epochs = torch.randperm(len(rows), generator=gen), 0, 0
    rows, masks = rows.to(DEV), masks.to(DEV)
    model.train()
    for step in range(steps):
        if at + batch > len(perm):
            perm, at, epochs = torch.randperm(len(rows), generator=gen), 0, epochs + 1
        idx = perm[at:at + batch].to(DEV)
        at += batch
        if step < warmup:
            rate = lr * (step + 1) / warmup
        else:
            t = (step - warmup) / max(1, steps - warmup)
            rate = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))
        for g in opt.param_groups:
            g["lr"] = rate
        loss = masked_loss(model, rows[idx], masks[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"  step {step} loss {loss.item():.3f}")
    return model, {"rows": len(rows), "epochs": epochs + at / len(rows),
                   "tokens": steps * batch * CTX}


@torch.no_grad()
def score(model, data, name):
    """Nats per learned token of a source, each example on its own."""
    model.eval()
    total, count = 0.0, 0.0
    for ids, learn in data.examples(name):
        ids, learn = ids[: CTX + 1].astype(np.int64), learn[: CTX + 1]
        r = torch.tensor(ids)[None]
        m = torch.tensor(learn[1:])[None]
        s, c = masked_loss(model, r, m, per_token=True)
        total, count = total + s.item(), count + c.item()
    return total / max(count, 1)


def detect(text):
    kana = han = letters = 0
    for c in text:
        o = ord(c)
        if 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9F:
            kana += 1
        elif 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF:
            han += 1
        if c.isalpha():
            letters += 1
    if letters == 0:
        return "und"
    if kana > 0 and (kana + han) * 100 // letters >= 20:
        return "ja"
    return "en"


def has_keyword(text, keyword):
    text = unicodedata.normalize("NFKC", text).lower()
    keyword = unicodedata.normalize("NFKC", keyword).lower()
    if not keyword[0].isascii() or not keyword[0].isalnum():
        return keyword in text
    at = text.find(keyword)
    while at >= 0:
        if at == 0 or not (text[at - 1].isascii() and text[at - 1].isalnum()):
            return True
        at = text.find(keyword, at + 1)
    return False


@torch.no_grad()
def suite(model, cases, tok, samples, seed=42):
    """Every case `samples` times (temperature 0.7, top-k 40, top-p 0.9, penalty 1.1)."""
    model.eval()
    prompts = [c["ids"] for c in cases for _ in range(samples)]
    width = max(len(p) for p in prompts)
    x = torch.full((len(prompts), width), BOS, dtype=torch.long)
    a = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        x[i, width - len(p):] = torch.tensor(p)
        a[i, width - len(p):] = 1
    torch.manual_seed(seed)
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=DEV == "cuda"):
        out = model.generate(
            input_ids=x.to(DEV), attention_mask=a.to(DEV), do_sample=True, temperature=0.7,
            top_k=40, top_p=0.9, repetition_penalty=1.1, max_new_tokens=64,
            eos_token_id=[EOS, BOS], pad_token_id=BOS,
        )
    replies = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in (EOS, BOS)), len(row))
        replies.append(tok.decode(row[:end], skip_special_tokens=True))
    by_case = [replies[i * samples:(i + 1) * samples] for i in range(len(cases))]
    own, other, other_n, language, n = 0, 0, 0, 0, 0
    for i, c in enumerate(cases):
        lang = c["language"] or detect(c["prompt"])
        for r in by_case[i]:
            n += 1
            language += detect(r) == lang
            if c["file"] == "bot_language":
                continue
            own += any(has_keyword(r, k) for k in c["keywords"])
            for j, d in enumerate(cases):
                if j != i and d["file"] == c["file"]:
                    other += any(has_keyword(r, k) for k in d["keywords"])
                    other_n += 1
    everyday = sum(c["file"] != "bot_language" for c in cases) * samples
    return {
        "on_topic": own / everyday,
        "chance": other / max(other_n, 1),
        "language": language / n,
        "replies": {c["file"] + "/" + c["id"]: by_case[i][:3] for i, c in enumerate(cases)},
    }


def main():
    data_path, out = sys.argv[1], sys.argv[2]
    names = sys.argv[3:] or list(CONFIGS)
    os.makedirs(out, exist_ok=True)
    log("device", DEV, torch.__version__)
    data = Data(data_path)
    cases = json.load(open(data_path.replace(".npz", "_suite.json"), encoding="utf-8"))
    tok = Tokenizer.from_file(os.path.join(os.path.dirname(data_path), "tokenizer.json"))
    estimate = {}
    for name in names:
        mix, objective, shape, batch, steps, lr = CONFIGS[name]
        steps = max(40, int(steps * SCALE))
        cost = estimate.get((shape["d"], batch), 0.0) * steps
        if time.time() - T0 + cost > BUDGET:
            log(f"skip {name}: about {cost:.0f} s would pass the budget")
            continue
        log(f"train {name}: {objective}, d={shape['d']} x{shape['layers']}, "
            f"batch {batch}, {steps} steps, lr {lr}")
        started = time.time()
        model, info = train(data, mix, objective, shape, batch, steps, lr)
        seconds = time.time() - started
        estimate[(shape["d"], batch)] = seconds / steps
        result = {"name": name, "objective": objective, "shape": shape, "batch": batch,
                  "steps": steps, "lr": lr, "mix": mix, "train_s": round(seconds, 1), **info}
        result["val_loss"] = score(model, data, "val")
        pgm, pgr = score(model, data, "pgm"), score(model, data, "pgr")
        result.update(prompt_loss=pgm, rotated_loss=pgr, prompt_gain=pgr - pgm)
        result.update(suite(model, cases, tok, samples=5))
        log(f"  {name}: val {result['val_loss']:.3f}, gain {result['prompt_gain']:.3f}, "
            f"on-topic {result['on_topic']:.2f} vs chance {result['chance']:.2f}, "
            f"language {result['language']:.2f}")
        with open(os.path.join(out, "results.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(result, ensure_ascii=False) + "\n")
        if name in SAVE:
            weights = {k: v.detach().to(torch.float16).cpu().contiguous()
                       for k, v in model.state_dict().items() if k != "lm_head.weight"}
            save_file(weights, os.path.join(out, f"{name}.safetensors"))
        del model
        if DEV == "cuda":
            torch.cuda.empty_cache()
    log("done")


if __name__ == "__main__":
    main()
