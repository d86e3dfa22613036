#!/usr/bin/env python3
"""ONNX Runtime side of `kaiwa bench infer`: the same workload on the same ONNX file.

Batch 1, a prompt of ids (i * 7919 + 13) % vocab, then greedy decoding one token at a time with
the KV cache (past_key_values.N.* in, present.N.* out). Prints one JSON line shaped like kaiwa's
InferReport. Used only as a yardstick, never by the product.
"""
import argparse
import json
import os
import resource
import time

import numpy as np
import onnxruntime as ort


def find_onnx(d):
    for c in ["model.onnx", "onnx/model.onnx"]:
        p = os.path.join(d, c)
        if os.path.isfile(p):
            return p
    raise SystemExit(f"no model.onnx in {d}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads; 0 = ONNX Runtime's default")
    a = ap.parse_args()

    path = find_onnx(a.model)
    so = ort.SessionOptions()
    if a.threads:
        so.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    past_names = sorted(n for n in inputs if n.startswith("past_key_values."))
    kv_shape = inputs[past_names[0]].shape
    heads, head_dim = int(kv_shape[1]), int(kv_shape[3])
    vocab = int(sess.get_outputs()[outputs.index("logits")].shape[-1])

    def step(ids, past, past_len):
        n = len(ids)
        feed = {"input_ids": np.array([ids], dtype=np.int64)}
        if "attention_mask" in inputs:
            feed["attention_mask"] = np.ones((1, past_len + n), dtype=np.int64)
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None, :]
        feed.update(past)
        res = dict(zip(outputs, sess.run(outputs, feed)))
        new_past = {n.replace("present", "past_key_values"): v for n, v in res.items() if n.startswith("present.")}
        return res["logits"][0, -1], new_past

    empty = {n: np.zeros((1, heads, 0, head_dim), dtype=np.float32) for n in past_names}
    prompt = [(i * 7919 + 13) % vocab for i in range(a.prompt_tokens)]
    step(prompt, empty, 0)  # warm-up
    prefills = []
    for _ in range(max(a.repeats, 1)):
        t = time.perf_counter()
        step(prompt, empty, 0)
        prefills.append((time.perf_counter() - t) * 1e3)
    prefills.sort()

    best = 0.0
    tokens = []
    for _ in range(max(a.repeats, 1)):
        logits, past = step(prompt, empty, 0)
        tokens = []
        past_len = len(prompt)
        t = time.perf_counter()
        for _ in range(a.new_tokens):
            nxt = int(np.argmax(logits))
            tokens.append(nxt)
            logits, past = step([nxt], past, past_len)
            past_len += 1
        best = max(best, a.new_tokens / (time.perf_counter() - t))

    threads = a.threads or "default"
    print(json.dumps({
        "runtime": f"onnxruntime-{ort.__version__}(threads={threads})",
        "model": path,
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "prefill_ms": prefills[len(prefills) // 2],
        "decode_tokens_per_s": best,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "tokens": tokens,
    }))


if __name__ == "__main__":
    main()
