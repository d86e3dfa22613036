#!/usr/bin/env python3
"""Fine-tunes a Hugging Face chat model on a kaiwa corpus with TRL's `SFTTrainer`, and saves a
directory that `kaiwa export-onnx` and `kaiwa run` / `kaiwa chat` take as it is.

The round trip (see recipes/README.md):

    kaiwa export-corpus --format openai --out corpus/
    python3 recipes/sft_trl.py --model SmolLM2-135M-Instruct/ --data corpus/ --out tuned/
    kaiwa export-onnx tuned/
    kaiwa chat --model tuned/

`--model` is a directory a Llama, Qwen2 or Mistral was saved to with `save_pretrained` (weights,
tokenizer and chat template); `--data` is what `kaiwa export-corpus --format openai` wrote:
`train.jsonl` and, if it held anything back, `validation.jsonl`, one
`{"messages": [...], "meta": {...}}` a line. Only `messages` is read: `meta` (where the
conversation came from, feedback on replies) is for people, not for the loss.

What is learned. Each example is rendered with the model's own chat template, the one kaiwa
prompts it with afterwards. By default the loss is on every token of the conversation (TRL's
default for conversational data), which works with any template. `--assistant-only-loss` puts it
on the assistant's turns only, as kaiwa's own trainer does; TRL can do that only with a template
that marks them with `{% generation %}` or that TRL knows a marked variant of (Qwen2.5, Qwen3,
Llama 3.x, Gemma, Phi-3 and a few more). SmolLM2's and TinyLlama's templates are not among them,
and TRL then stops with an error rather than train on the wrong tokens.

The output directory gets the weights (safetensors, in float32: training runs in float32 with
bf16 autocast where the GPU has it), config.json, generation_config.json and the tokenizer with
its chat template, through `save_pretrained`.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fine-tune a Hugging Face chat model on `kaiwa export-corpus --format openai`."
    )
    p.add_argument("--model", type=Path, required=True, help="directory saved by save_pretrained")
    p.add_argument("--data", type=Path, required=True, help="the export: train.jsonl [validation.jsonl]")
    p.add_argument("--out", type=Path, required=True, help="where the fine-tuned model is saved")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (linear decay)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="examples per device and step")
    p.add_argument("--grad-accum", type=int, default=1, help="steps accumulated per optimiser update")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per example; longer ones are cut")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on where the CUDA GPU supports it)",
    )
    p.add_argument("--assistant-only-loss", action="store_true", help="learn the assistant's turns only")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--logging-steps", type=int, default=10)
    return p.parse_args()


def read_split(path: Path) -> Dataset:
    """The `messages` of each line of a kaiwa export (`meta` is left out)."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
                rows.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages]})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                sys.exit(f"{path}:{number}: not a kaiwa openai-format example ({e!r})")
    if not rows:
        sys.exit(f"{path}: no examples")
    return Dataset.from_list(rows)


def main() -> None:
    args = parse_args()
    train_file = args.data / "train.jsonl"
    if not train_file.is_file():
        sys.exit(f"{train_file} is missing: run `kaiwa export-corpus --format openai --out {args.data}`")
    validation_file = args.data / "validation.jsonl"
    train = read_split(train_file)
    validation = read_split(validation_file) if validation_file.is_file() else None

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if not tokenizer.chat_template:
        sys.exit(f"{args.model}: the tokenizer has no chat template; fine-tune a chat (instruct) model")
    bf16 = args.bf16
    if bf16 is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # float32 master weights; with --bf16 the forward pass runs in bf16 (mixed precision).
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    config = SFTConfig(
        output_dir=str(args.out),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length,
        assistant_only_loss=args.assistant_only_loss,
        bf16=bf16,
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        eval_strategy="epoch" if validation is not None and args.max_steps < 0 else "no",
        save_strategy="no",
        report_to="none",
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=validation,
        processing_class=tokenizer,
    )
    result = trainer.train()
    summary = {
        "examples": {"train": len(train), "validation": len(validation) if validation is not None else 0},
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "bf16": bf16,
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }
    if validation is not None:
        summary["validation_loss"] = trainer.evaluate()["eval_loss"]

    # Training switched the KV cache off; a model saved for inference wants it on.
    trainer.model.config.use_cache = True
    # The weights (safetensors), config, generation config and the tokenizer with its template.
    trainer.save_model(str(args.out))
    tokenizer.save_pretrained(args.out)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
