"""Turns a sweep checkpoint (fp16 safetensors, small preset) into a kaiwa model directory with
f32 weights, beside the default model's config and tokenizer, so `kaiwa eval` can score it.

    python3 research/sweep/to_model_dir.py CHECKPOINT.safetensors OUT_DIR
"""

import os
import shutil
import sys

from safetensors.torch import load_file, save_file

src, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join("models/kaiwa", f), out)
weights = {k: v.float().contiguous() for k, v in load_file(src).items()}
save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
