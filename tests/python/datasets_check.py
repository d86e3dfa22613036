"""Independent reader for tests/corpus.rs: loads a `kaiwa export-corpus` directory with the
Hugging Face `datasets` library (as TRL and axolotl do) and reports the row counts and how many
examples break the chat format (roles must alternate user/assistant after an optional system
prompt, starting with user and ending with assistant)."""

import json
import os
import sys

from datasets import load_dataset


def bad_roles(example):
    roles = [m["role"] for m in example["messages"]]
    while roles and roles[0] == "system":
        roles = roles[1:]
    if not roles or roles[0] != "user" or roles[-1] != "assistant":
        return True
    return any(a == b for a, b in zip(roles, roles[1:])) or any(
        r not in ("user", "assistant") for r in roles
    )


def main():
    out = sys.argv[1]
    files = {"train": os.path.join(out, "train.jsonl")}
    val = os.path.join(out, "validation.jsonl")
    if os.path.exists(val):
        files["validation"] = val
    ds = load_dataset("json", data_files=files, cache_dir=os.path.join(out, ".cache"))
    report = {split: ds[split].num_rows for split in ds}
    report.setdefault("validation", 0)
    report["bad_roles"] = sum(bad_roles(e) for split in ds for e in ds[split])
    report["columns"] = sorted(ds["train"].column_names)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
