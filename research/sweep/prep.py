"""Tokenizes the recipe's data sources the way `kaiwa train` does (src/train/data.rs), for the
PyTorch sweep in sweep.py. Research only: nothing in kaiwa runs this.

    python3 research/sweep/prep.py RECIPE_WORK_DIR OUT.npz

RECIPE_WORK_DIR is a `models/recipe.sh` WORK folder (corpus/, corpus_ja/, corpus_ja_sys/,
tanaka_ja.tsv, tokenizer/) with `kaiwa derive-dialogue` output in derived/.
"""

import json
import sys

import numpy as np
import yaml
from tokenizers import Tokenizer

BOS, EOS = 0, 2


def chat_tokens(tok, messages):
    """ChatML rendering, loss on the assistant's contents and the end-of-turn after each."""
    full, spans = "", []
    for m in messages:
        full += "<|im_start|>" + m["role"] + "\n"
        if m["role"] == "assistant" and m["content"]:
            spans.append((len(full), len(full) + len(m["content"])))
        full += m["content"] + "<|im_end|>\n"
    if not spans:
        return None
    ids, learn, at = [], [], 0
    ends = []
    for s, e in spans:
        ctx = tok.encode(full[at:s], add_special_tokens=False).ids
        ids += ctx
        learn += [False] * len(ctx)
        content = tok.encode(full[s:e], add_special_tokens=False).ids
        learn += [len(ids) + i > 0 for i in range(len(content))]
        ids += content
        ends.append(len(ids))
        at = e
    for after in ends:
        if after < len(ids) and ids[after] == EOS:
            learn[after] = True
    ids.append(EOS)
    learn.append(True)
    return ids, learn


def text_tokens(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    return [BOS] + ids, [False] + [True] * len(ids)


def chat_file(tok, path):
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                t = chat_tokens(tok, json.loads(line)["messages"])
                if t:
                    out.append(t)
    return out


def text_file(tok, path):
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                out.append(text_tokens(tok, line))
    return out


def main():
    work, dest = sys.argv[1], sys.argv[2]
    tok = Tokenizer.from_file(f"{work}/tokenizer/tokenizer.json")
    sources = {
        "dlg": chat_file(tok, f"{work}/corpus/train.jsonl"),
        "ja": chat_file(tok, f"{work}/corpus_ja/train.jsonl"),
        "jasys": chat_file(tok, f"{work}/corpus_ja_sys/train.jsonl"),
        "tanaka": text_file(tok, f"{work}/tanaka_ja.tsv"),
        "xja": chat_file(tok, f"{work}/derived/exchanges_ja.jsonl"),
        "xen": chat_file(tok, f"{work}/derived/exchanges_en.jsonl"),
        "rja": chat_file(tok, f"{work}/derived/replies_ja.jsonl"),
        "ren": chat_file(tok, f"{work}/derived/replies_en.jsonl"),
        "val": chat_file(tok, f"{work}/corpus/validation.jsonl"),
    }
    # Prompt dependence (as `kaiwa eval` measures it): the first reply of the first 200
    # validation conversations after its own prompt and after the previous conversation's.
    firsts = []
    with open(f"{work}/corpus/validation.jsonl", encoding="utf-8") as f:
        for line in f:
            m = json.loads(line)["messages"]
            turns = [x for x in m if x["role"] != "system"]
            if len(turns) >= 2 and turns[0]["role"] == "user" and turns[1]["role"] == "assistant":
                firsts.append((turns[0], turns[1]))
    firsts = firsts[:200]
    sources["pgm"] = [chat_tokens(tok, [u, a]) for u, a in firsts]
    sources["pgr"] = [chat_tokens(tok, [firsts[i - 1][0], a]) for i, (_, a) in enumerate(firsts)]
    arrays = {}
    for name, examples in sources.items():
        lengths = np.array([len(i) for i, _ in examples], dtype=np.int64)
        arrays[name + "_ids"] = np.concatenate([np.array(i, dtype=np.uint16) for i, _ in examples])
        arrays[name + "_learn"] = np.concatenate([np.array(l, dtype=bool) for _, l in examples])
        arrays[name + "_off"] = np.concatenate([[0], np.cumsum(lengths)])
        print(f"{name}: {len(examples)} examples, {lengths.sum()} tokens, "
              f"{int(arrays[name + '_learn'].sum())} learned", file=sys.stderr)
    np.savez_compressed(dest, **arrays)
    suite = []
    for name in ("everyday_en", "everyday_ja", "bot_language"):
        doc = yaml.load(open(f"evals/{name}.yaml", encoding="utf-8"), Loader=yaml.BaseLoader)
        for case in doc["cases"]:
            msgs = []
            system = case.get("system", doc.get("system"))
            if system:
                msgs.append({"role": "system", "content": system})
            msgs.append({"role": "user", "content": case["prompt"]})
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
            text += "<|im_start|>assistant\n"
            suite.append({
                "file": name,
                "id": case["id"],
                "language": case.get("language", doc.get("language")),
                "prompt": case["prompt"],
                "keywords": case.get("keywords_any", []),
                "ids": tok.encode(text, add_special_tokens=False).ids,
            })
    with open(dest.replace(".npz", "_suite.json"), "w", encoding="utf-8") as f:
        json.dump(suite, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
