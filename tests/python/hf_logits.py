#!/usr/bin/env python3
"""Independent cross-check of a Hugging Face model directory: the logits `transformers` computes.

Usage: hf_logits.py MODEL_DIR TOKEN_ID...

Prints a JSON list with the logits of every position, [len(ids)][vocab], in float32.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM


def main():
    model_dir, ids = sys.argv[1], [int(t) for t in sys.argv[2:]]
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    print(json.dumps(logits.tolist()))


if __name__ == "__main__":
    main()
