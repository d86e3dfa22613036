"""The training step of `kaiwa bench train`, in PyTorch eager fp32 on the CPU: the reference
that kaiwa's training speed is compared with (`kaiwa bench train --pytorch` runs it).

Same architecture (by default kaiwa's small preset: d=256, 4 layers, 4 heads, SwiGLU 688, vocab
8192, untied head; every size is an option), same batch (16 x 256), same step (forward, mean
cross-entropy, backward, global-norm clipping to 1.0, AdamW betas 0.9/0.95 eps 1e-8 with weight
decay 0.1 on matrices). Not part of the product: PyTorch is only needed to run this comparison
(`pip install torch`).

usage: python3 bench/pytorch_train.py [--impl manual|hf] [--threads N] [--steps 10] [--peak]
  manual: a hand-written module with F.scaled_dot_product_attention (what kaiwa's model does)
  hf:     transformers' LlamaForCausalLM (sdpa attention)
The last line is `tokens_per_s N`, which `kaiwa bench train --pytorch` reads.
"""

import argparse
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# kaiwa's small preset; main() replaces these from the command line.
VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, EPS, THETA = 8192, 256, 688, 4, 4, 4, 1e-5, 10000.0
TIE = False


class RmsNorm(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * self.weight


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        d = HIDDEN // HEADS
        self.input_layernorm = RmsNorm(HIDDEN)
        self.q_proj = nn.Linear(HIDDEN, HEADS * d, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * d, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * d, bias=False)
        self.o_proj = nn.Linear(HEADS * d, HIDDEN, bias=False)
        self.post_attention_layernorm = RmsNorm(HIDDEN)
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        d = HIDDEN // HEADS
        y = self.input_layernorm(x)
        q = self.q_proj(y).view(b, t, HEADS, d).transpose(1, 2)
        k = self.k_proj(y).view(b, t, KV_HEADS, d).transpose(1, 2)
        v = self.v_proj(y).view(b, t, KV_HEADS, d).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=HEADS != KV_HEADS)
        x = x + self.o_proj(ctx.transpose(1, 2).reshape(b, t, HIDDEN))
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class Llama(nn.Module):
    def __init__(self, context):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RmsNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
        if TIE:
            self.lm_head.weight = self.embed_tokens.weight
        d = HIDDEN // HEADS
        inv = 1.0 / THETA ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.arange(context, dtype=torch.float64)[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], -1)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        return self.lm_head(self.norm(x))


def hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
        rms_norm_eps=EPS, rope_theta=THETA, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    return lambda tokens: model(tokens).logits, model


def peak_matmul():
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        a @ b
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        gflops = 2 * n**3 * 5 / (time.perf_counter() - start) / 1e9
        print(f"peak f32 matmul {n}^3 (MKL) on {threads} thread(s): {gflops:.1f} GFLOP/s")


def main():
    global VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, TIE
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=["manual", "hf"], default="manual")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak", action="store_true")
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--intermediate", type=int, default=INTER)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--heads", type=int, default=HEADS)
    ap.add_argument("--kv-heads", type=int, default=KV_HEADS)
    ap.add_argument("--tie", choices=["true", "false"], default="false")
    args = ap.parse_args()
    VOCAB, HIDDEN, INTER, LAYERS = args.vocab, args.hidden, args.intermediate, args.layers
    HEADS, KV_HEADS, TIE = args.heads, args.kv_heads, args.tie == "true"
    torch.set_num_threads(args.threads)
    if args.peak:
        peak_matmul()
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.impl == "manual":
        model = Llama(args.context)
        forward = model
    else:
        forward, model = hf_model()
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
    )
    tokens = torch.randint(0, VOCAB, (args.batch, args.context + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    mask = torch.ones(targets.shape)

    def step(i):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, (i + 1) / 2)
        logits = forward(inputs).reshape(-1, VOCAB)
        nll = F.cross_entropy(logits, targets, reduction="none")
        loss = (nll * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    print(f"pytorch {torch.__version__} {args.impl}: {params} parameters, batch {args.batch} x {args.context}, threads {torch.get_num_threads()}")
    for i in range(args.warmup):
        start = time.perf_counter()
        loss = step(i)
        print(f"warm-up {i}: loss {loss:.4f} {1e3 * (time.perf_counter() - start):.0f} ms")
    times = []
    cpu_start = time.process_time()
    for i in range(args.steps):
        start = time.perf_counter()
        loss = step(args.warmup + i)
        times.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu_start
    tokens = args.batch * args.context * args.steps
    tokens_per_s = tokens / sum(times)
    # As kaiwa counts: 6 per weight multiply (the embedding lookup is none, a tied head is one),
    # plus causal attention.
    norms = HIDDEN * (2 * LAYERS + 1)
    flops_per_token = 6 * (params - norms - (0 if TIE else VOCAB * HIDDEN)) + 6 * LAYERS * HIDDEN * args.context
    times.sort()
    print(
        f"timed {args.steps} steps: {tokens_per_s:.0f} tokens/s, step median {1e3 * times[len(times) // 2]:.0f} ms "
        f"(min {1e3 * times[0]:.0f}, max {1e3 * times[-1]:.0f}), last loss {loss:.4f}"
    )
    print(
        f"process CPU time {cpu:.2f} s over {sum(times):.2f} s wall ({cpu / sum(times):.2f} cores busy); "
        f"{tokens / cpu:.0f} tokens per CPU-second"
    )
    print(
        f"achieved {flops_per_token * tokens_per_s / 1e9:.1f} GFLOP/s; "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    print(f"tokens_per_s {tokens_per_s:.1f}")


if __name__ == "__main__":
    main()
