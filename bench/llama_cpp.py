#!/usr/bin/env python3
"""llama.cpp side of `kaiwa bench infer`: the same workload on the same weights, converted to GGUF.

Used only as a yardstick, never by the product and never in CI. Like bench/onnxruntime_decode.py it
prints one JSON line shaped like kaiwa's InferReport (the last line of stdout; progress goes to
stderr): batch 1, a prompt of ids (i * 7919 + 13) % vocab; prefill = median of --repeats timed
prefills after one warm-up; decode = best over --repeats of new_tokens / time for greedy decoding
one token at a time after the prefill.

What it does, each step cached under --cache (default ~/.cache/kaiwa/llama-cpp):
  1. llama.cpp: `pip download`s the pinned llama-cpp-python source distribution from PyPI (it vendors
     llama.cpp; LLAMA_CPP_PYTHON / LLAMA_CPP_COMMIT below), builds libllama.so and llama-quantize
     from the vendored tree with cmake (Release, GGML_NATIVE=ON: -march=native, i.e. AVX2 here;
     OpenMP; shared libs) into build-<version>/. cmake comes from a small venv (`pip install cmake`)
     when there is none on PATH. --build forces a rebuild. About 25-35 minutes on 2 busy cores,
     ~80 MB download, ~1 GB disk.
  2. GGUF: converts the model directory (Hugging Face Llama layout: config.json + model.safetensors)
     with numpy and the vendored gguf-py, no torch: what convert_hf_to_gguf.py does for Llama
     (tensor names, q/k rows permuted from HF's rotate-half order to GGUF's interleaved one, the
     llama.* hyperparameters; a tied head is left out, llama.cpp then reuses token_embd). The
     vocabulary is written as "no_vocab" with vocab_size dummy tokens: only ids are fed, so no
     tokenizer is needed and random models work. q8_0 comes from the built llama-quantize (Q8_0;
     it falls back to another type for rows whose length is not a multiple of 32, as llama.cpp
     always does). Cached as gguf/<key>-<quant>.gguf, key = hash of config.json + the weights'
     path, size and mtime.
  3. Measures in a fresh process (so the conversion does not count in peak RSS) through the C API,
     called with ctypes via the pinned version's own bindings (llama_cpp/llama_cpp.py of the sdist,
     imported without the high-level package): one llama_decode of the whole prompt with logits
     asked for the last position only, then one llama_decode per generated token; argmax with
     numpy over a zero-copy view of llama_get_logits_ith(ctx, -1). The KV cache is cleared
     (llama_memory_clear) between runs, outside the timed part. Context parameters are llama.cpp's
     defaults (flash attention auto, f16 KV cache: --kv-type f32 changes that) but for n_ctx
     (prompt + new tokens), n_batch/n_ubatch (>= the prompt, so the prefill is one graph) and the
     threads (n_threads = n_threads_batch = --threads); and use_extra_bufts is off unless
     --extra-bufts: the AMX kernels it would pick for q8_0 die of SIGILL on the development machine
     (its CPUID reports AMX, the hypervisor does not let it run), and x86 has no other repacking
     for f32 or q8_0 weights.
     Python's per-token overhead (filling the one-token batch, the ctypes call, the argmax over
     the vocabulary) is measured on every run and printed to stderr: 8-10 us per token with the
     8192-token vocabulary, 19 us with 49152 on the development machine (busy), i.e. about 1% of
     a 1-2 ms decode step, and the same kind of work ONNX Runtime's script does per token.

usage: python3 bench/llama_cpp.py --model models/kaiwa [--quant f32|q8_0] [--threads N]
           [--prompt-tokens 256] [--new-tokens 128] [--repeats 3] [--build] [--cache DIR]
"""
import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time

LLAMA_CPP_PYTHON = "0.3.36"  # PyPI llama-cpp-python, released 2026-10-01
LLAMA_CPP_COMMIT = "0c1e57098"  # the llama.cpp it vendors (ggml-org/llama.cpp b11312), per its CHANGELOG
LLAMA_CPP_BUILD = 11312  # its build number
CONVERTER_VERSION = 1  # bump when the GGUF written below changes, to invalidate cached files


def log(*a):
    print("[llama.cpp]", *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# 1. building llama.cpp


def src_dir(cache):
    return os.path.join(cache, "src", f"llama_cpp_python-{LLAMA_CPP_PYTHON}")


def build_dir(cache):
    return os.path.join(cache, f"build-{LLAMA_CPP_PYTHON}")


def lib_dir(cache):
    return os.path.join(build_dir(cache), "bin")


def built(cache):
    b = lib_dir(cache)
    return all(os.path.isfile(os.path.join(b, f)) for f in ["libllama.so", "llama-quantize"]) and os.path.isdir(
        os.path.join(src_dir(cache), "llama_cpp")
    )


def fetch_source(cache):
    src = src_dir(cache)
    if os.path.isfile(os.path.join(src, "vendor", "llama.cpp", "CMakeLists.txt")):
        return src
    dl = os.path.join(cache, "src")
    os.makedirs(dl, exist_ok=True)
    sdist = os.path.join(dl, f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz")
    if not os.path.isfile(sdist):
        log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} source distribution from PyPI")
        # --no-binary for this package only: ':all:' would also build pip's build dependencies
        # (cmake itself) from source just to read the metadata.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", dl], check=True, stdout=sys.stderr)
    log("unpacking", sdist)
    with tarfile.open(sdist) as t:
        t.extractall(dl, filter="data") if hasattr(tarfile, "data_filter") else t.extractall(dl)
    changelog = open(os.path.join(src, "CHANGELOG.md"), encoding="utf-8").read()
    section = changelog.split(f"## [{LLAMA_CPP_PYTHON}]", 1)[-1].split("## [", 1)[0]
    if LLAMA_CPP_COMMIT not in section:
        log(f"warning: the CHANGELOG of {LLAMA_CPP_PYTHON} does not name llama.cpp commit {LLAMA_CPP_COMMIT}")
    return src


def find_cmake(cache):
    c = shutil.which("cmake")
    if c:
        return c
    venv = os.path.join(cache, "venv")
    c = os.path.join(venv, "bin", "cmake")
    if not os.path.isfile(c):
        log("no cmake on PATH: pip install cmake into", venv)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "cmake"], check=True, stdout=sys.stderr)
    return c


def build(cache, jobs):
    src = fetch_source(cache)
    cmake = find_cmake(cache)
    b = build_dir(cache)
    log(f"building llama.cpp {LLAMA_CPP_COMMIT} (libllama.so, llama-quantize) in {b} with {jobs} jobs")
    t = time.time()
    subprocess.run([
        cmake, "-S", os.path.join(src, "vendor", "llama.cpp"), "-B", b,
        "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
        f"-DLLAMA_BUILD_COMMIT={LLAMA_CPP_COMMIT}", f"-DLLAMA_BUILD_NUMBER={LLAMA_CPP_BUILD}",
    ], check=True, stdout=sys.stderr)
    subprocess.run([cmake, "--build", b, "--target", "llama", "llama-quantize", "-j", str(jobs)],
                   check=True, stdout=sys.stderr)
    log(f"built in {time.time() - t:.0f} s")


# ---------------------------------------------------------------------------------------------
# 2. converting to GGUF

ST_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


def read_safetensors(path):
    """{name: float32 ndarray} from a .safetensors file: an 8-byte little-endian header length, a
    JSON header (dtype, shape, data_offsets per tensor) and the raw little-endian data."""
    import numpy as np

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in ST_DTYPES:
            raise SystemExit(f"{path}: tensor {name} has dtype {info['dtype']}, not supported")
        a, b = info["data_offsets"]
        arr = data[a:b].view(ST_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def weight_files(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
        return [os.path.join(model_dir, f) for f in files]
    p = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(p):
        raise SystemExit(f"no model.safetensors in {model_dir}")
    return [p]


def permute_rotary(w, n_head):
    """HF's rotate-half row order (per head: the first halves of the pairs, then the second
    halves) to GGUF's interleaved one; the same as LlamaModel.permute in convert_hf_to_gguf.py."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def convert_f32(model_dir, out, gguf_py):
    sys.path.insert(0, gguf_py)
    import gguf
    import numpy as np

    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    arch = cfg.get("model_type", "llama")
    if arch != "llama":
        log(f"warning: model_type {arch!r}, converting as llama")
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // n_head
    layers = cfg["num_hidden_layers"]
    tied = cfg.get("tie_word_embeddings", False)
    rope = cfg.get("rope_theta")
    if rope is None:
        rope = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)

    tensors = {}
    for f in weight_files(model_dir):
        tensors.update(read_safetensors(f))
    vocab = cfg.get("vocab_size") or tensors["model.embed_tokens.weight"].shape[0]

    w = gguf.GGUFWriter(out, "llama")
    w.add_name(os.path.basename(os.path.normpath(model_dir)))
    w.add_block_count(layers)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # Ids only are fed: a "no_vocab" vocabulary with vocab_size dummy tokens, which llama.cpp
    # accepts for any model, tokenizer.json or not.
    w.add_tokenizer_model("no_vocab")

    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "model.embed_tokens.weight":
            new = "token_embd.weight"
        elif name == "model.norm.weight":
            new = "output_norm.weight"
        elif name == "lm_head.weight":
            if tied:
                continue
            new = "output.weight"
        elif name.startswith("model.layers."):
            bid, rest = name[len("model.layers."):].split(".", 1)
            if rest not in LAYER_NAMES:
                raise SystemExit(f"unexpected tensor {name}")
            new = f"blk.{bid}.{LAYER_NAMES[rest]}"
            if rest.startswith("self_attn.q_proj"):
                t = permute_rotary(t, n_head)
            elif rest.startswith("self_attn.k_proj"):
                t = permute_rotary(t, n_kv)
        else:
            raise SystemExit(f"unexpected tensor {name}")
        w.add_tensor(new, np.ascontiguousarray(t, dtype=np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def model_key(model_dir):
    h = hashlib.sha256()
    h.update(f"v{CONVERTER_VERSION}".encode())
    h.update(open(os.path.join(model_dir, "config.json"), "rb").read())
    for f in weight_files(model_dir):
        st = os.stat(f)
        h.update(f"{os.path.realpath(f)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def gguf_for(model_dir, quant, cache, threads):
    d = os.path.join(cache, "gguf")
    os.makedirs(d, exist_ok=True)
    key = model_key(model_dir)
    f32 = os.path.join(d, f"{key}-f32.gguf")
    if not os.path.isfile(f32):
        log(f"converting {model_dir} to {f32}")
        t = time.time()
        # in a child, so that the converted arrays do not count in the benchmark's peak RSS
        subprocess.run([sys.executable, __file__, "--internal-convert", model_dir, f32 + ".tmp", "--cache", cache],
                       check=True)
        os.replace(f32 + ".tmp", f32)
        log(f"converted in {time.time() - t:.1f} s")
    if quant == "f32":
        return f32
    q = os.path.join(d, f"{key}-{quant}.gguf")
    if not os.path.isfile(q):
        log(f"quantizing to {q}")
        subprocess.run([os.path.join(lib_dir(cache), "llama-quantize"), f32, q + ".tmp", quant.upper(),
                        str(threads or os.cpu_count())], check=True, stdout=sys.stderr, stderr=sys.stderr)
        os.replace(q + ".tmp", q)
    return q


# ---------------------------------------------------------------------------------------------
# 3. measuring


def load_bindings(cache):
    """The pinned version's ctypes bindings (llama_cpp/llama_cpp.py), without the package's
    __init__ (which would import the high-level Llama class and its dependencies)."""
    import importlib
    import types

    os.environ["LLAMA_CPP_LIB_PATH"] = lib_dir(cache)
    pkg = types.ModuleType("llama_cpp")
    pkg.__path__ = [os.path.join(src_dir(cache), "llama_cpp")]
    sys.modules["llama_cpp"] = pkg
    return importlib.import_module("llama_cpp.llama_cpp")


def measure(a, path):
    import ctypes

    import numpy as np

    L = load_bindings(a.cache)
    if not a.verbose:
        @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
        def quiet(level, text, user):
            pass
        L.llama_log_set(quiet, None)
        measure.quiet = quiet  # keep the callback alive
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    # Extra buffer types repack weights for special kernels. On x86 the only one that applies to
    # f32 or q8_0 weights is AMX (q8_0), and on the development machine, whose CPUID reports AMX,
    # its kernels die of SIGILL (the hypervisor does not let them run): off unless asked for.
    mp.use_extra_bufts = a.extra_bufts
    model = L.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not load {path}")
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    cp = L.llama_context_default_params()
    n_ctx = a.prompt_tokens + a.new_tokens + 1
    cp.n_ctx = n_ctx
    cp.n_batch = max(a.prompt_tokens, cp.n_batch)
    cp.n_ubatch = max(a.prompt_tokens, cp.n_ubatch)
    cp.n_seq_max = 1
    threads = a.threads or os.cpu_count()
    cp.n_threads = threads
    cp.n_threads_batch = threads
    cp.no_perf = True
    if a.kv_type == "f32":
        cp.type_k = L.GGML_TYPE_F32
        cp.type_v = L.GGML_TYPE_F32
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama.cpp could not create a context")
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(max(a.prompt_tokens, 1), 0, 1)

    def fill(ids, pos0):
        n = len(ids)
        batch.n_tokens = n
        for i, t in enumerate(ids):
            batch.token[i] = t
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == n - 1

    def run():
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise SystemExit(f"llama_decode returned {rc}")

    def decode(ids, pos0):
        fill(ids, pos0)
        run()

    def argmax_last():
        p = L.llama_get_logits_ith(ctx, -1)
        return int(np.ctypeslib.as_array(p, shape=(vocab,)).argmax())

    prompt = [(i * 7919 + 13) % vocab for i in range(a.prompt_tokens)]
    L.llama_memory_clear(mem, True)
    decode(prompt, 0)  # warm-up
    prefills = []
    for _ in range(max(a.repeats, 1)):
        L.llama_memory_clear(mem, True)
        fill(prompt, 0)  # the same batch every time: filled outside the timed part
        t = time.perf_counter()
        run()
        prefills.append((time.perf_counter() - t) * 1e3)
    prefills.sort()
    log("prefill ms:", " ".join(f"{p:.2f}" for p in prefills))

    best = 0.0
    tokens = []
    for _ in range(max(a.repeats, 1)):
        L.llama_memory_clear(mem, True)
        decode(prompt, 0)
        tokens = []
        pos = len(prompt)
        t = time.perf_counter()
        for _ in range(a.new_tokens):
            nxt = argmax_last()
            tokens.append(nxt)
            decode([nxt], pos)
            pos += 1
        rate = a.new_tokens / (time.perf_counter() - t)
        log(f"decode: {rate:.1f} tokens/s")
        best = max(best, rate)

    # Python's share of a decode step: the same argmax and batch filling, without llama_decode.
    n = 2000
    t = time.perf_counter()
    for i in range(n):
        fill([argmax_last()], pos)
    overhead_us = (time.perf_counter() - t) / n * 1e6
    log(f"python overhead per token: {overhead_us:.1f} us ({overhead_us * best / 1e4:.2f}% of a decode step)")

    L.llama_batch_free(batch)
    kv = ("" if a.kv_type == "f16" else f", kv={a.kv_type}") + (", extra-bufts" if a.extra_bufts else "")
    report = {
        "runtime": f"llama.cpp({LLAMA_CPP_COMMIT}, {a.quant}, threads={threads}{kv})",
        "model": path,
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "prefill_ms": prefills[len(prefills) // 2],
        "decode_tokens_per_s": best,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "tokens": tokens,
    }
    L.llama_free(ctx)
    L.llama_model_free(model)
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a kaiwa / Hugging Face Llama model directory")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads; 0 = all cores")
    ap.add_argument("--quant", choices=["f32", "q8_0"], default="f32")
    ap.add_argument("--kv-type", choices=["f16", "f32"], default="f16",
                    help="KV cache type (f16 is llama.cpp's default)")
    ap.add_argument("--extra-bufts", action="store_true",
                    help="let llama.cpp repack weights into extra buffer types (AMX for q8_0 on x86)")
    ap.add_argument("--build", action="store_true", help="(re)build llama.cpp even if the cache has it")
    ap.add_argument("--build-jobs", type=int, default=min(os.cpu_count() or 1, 4))
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "kaiwa", "llama-cpp"))
    ap.add_argument("--verbose", action="store_true", help="keep llama.cpp's own log")
    ap.add_argument("--internal-convert", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--internal-measure", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.cache = os.path.abspath(a.cache)

    if a.internal_convert:
        convert_f32(a.internal_convert[0], a.internal_convert[1],
                    os.path.join(src_dir(a.cache), "vendor", "llama.cpp", "gguf-py"))
        return
    if a.internal_measure:
        print(json.dumps(measure(a, a.internal_measure)), flush=True)
        return

    if not a.model:
        ap.error("--model is required")
    if a.build or not built(a.cache):
        build(a.cache, a.build_jobs)
    path = gguf_for(a.model, a.quant, a.cache, a.threads)
    # in a fresh process, so that neither the build nor the conversion counts in peak RSS
    args = [sys.executable, __file__, "--internal-measure", path, "--cache", a.cache, "--quant", a.quant,
            "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens),
            "--repeats", str(a.repeats), "--threads", str(a.threads), "--kv-type", a.kv_type]
    if a.verbose:
        args.append("--verbose")
    if a.extra_bufts:
        args.append("--extra-bufts")
    sys.exit(subprocess.run(args).returncode)


if __name__ == "__main__":
    main()
