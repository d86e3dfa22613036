#!/usr/bin/env python3
"""Independent cross-check of kaiwa's ONNX export: runs a graph in ONNX Runtime.

Usage: ort_crosscheck.py MODEL.onnx CASE.json OUT.json

CASE.json: {"tokens": [...], "prefill": k, "batch2": bool}. The first `prefill` tokens are fed at
once (past = 0), the rest one at a time with the KV cache. OUT.json gets the logits of every
position, [len(tokens)][vocab]. With "batch2", the prefill is also run as a batch of two with
the first row left-padded, and the logits of the second (unpadded) row are written as
"batch_row" so the test can check batching and the attention mask.
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def main():
    model, case_path, out_path = sys.argv[1:4]
    case = json.load(open(case_path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    past_names = sorted(n for n in inputs if n.startswith("past_key_values."))
    kv = inputs[past_names[0]].shape
    heads, head_dim = int(kv[1]), int(kv[3])

    def run(ids, mask, positions, past):
        feed = {"input_ids": np.array(ids, dtype=np.int64)}
        if "attention_mask" in inputs:
            feed["attention_mask"] = np.array(mask, dtype=np.int64)
        if "position_ids" in inputs:
            feed["position_ids"] = np.array(positions, dtype=np.int64)
        feed.update(past)
        res = dict(zip(outputs, sess.run(outputs, feed)))
        new_past = {n.replace("present", "past_key_values"): v for n, v in res.items() if n.startswith("present.")}
        return res["logits"], new_past

    tokens, k = case["tokens"], case["prefill"]
    past = {n: np.zeros((1, heads, 0, head_dim), dtype=np.float32) for n in past_names}
    logits, past = run([tokens[:k]], [[1] * k], [list(range(k))], past)
    rows = [r.tolist() for r in logits[0]]
    for i in range(k, len(tokens)):
        logits, past = run([[tokens[i]]], [[1] * (i + 1)], [[i]], past)
        rows.append(logits[0, -1].tolist())
    out = {"logits": rows}
    if case.get("batch2"):
        pad = 3
        ids = [[0] * pad + tokens[: k - pad], tokens[:k]]
        mask = [[0] * pad + [1] * (k - pad), [1] * k]
        positions = [[0] * pad + list(range(k - pad)), list(range(k))]
        empty = {n: np.zeros((2, heads, 0, head_dim), dtype=np.float32) for n in past_names}
        logits, _ = run(ids, mask, positions, empty)
        out["batch_row"] = logits[1].tolist()
        out["padded_row"] = logits[0, pad:].tolist()
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    main()
