#!/usr/bin/env python3
"""Build kaiwa's starter corpus under data/ from data that package registries carry.

    python3 data/build_starter.py                 # fetch, build, write data/starter, data/licenses, data/README.md
    python3 data/build_starter.py --downloads DIR # keep (and reuse) the downloaded archives in DIR

Sources (pinned; each archive's SHA-256 is checked):
  * PyPI  chitchat-dataset 0.9.0  (wheel)  chitchat_dataset/dataset.json          MIT
  * PyPI  chatterbot-corpus 1.3.3 (sdist)  chatterbot_corpus/data/{english,japanese}/*.yml  BSD-3-Clause
  * crates.io tanaka 0.1.0 (via cargo)     examples.utf.xz                           CC BY 2.0 FR (data)

Outputs (deterministic: same bytes on every run with the same Python/zlib; gzip mtime 0, no name):
  data/starter/chitchat_en.jsonl.gz      OpenAI chat JSONL, real English small talk
  data/starter/chatterbot_en.jsonl.gz    OpenAI chat JSONL, ChatterBot's English Q/A
  data/starter/chatterbot_ja.jsonl.gz    OpenAI chat JSONL, ChatterBot's (machine-translated) Japanese Q/A
  data/starter/tanaka_ja_en.tsv.gz       japanese<TAB>english sentence pairs (not dialogue)
  data/starter/stats.json                sizes, counts, hashes, what was dropped
  data/licenses/*.txt                    licence texts taken from inside the packages
  data/README.md                         the data card (generated from stats.json)

Only the standard library is used by this script itself; it runs `python3 -m pip download
--no-deps` (for the sdist pip builds its metadata, fetching setuptools from PyPI) and
`cargo fetch` / `cargo metadata` in a throwaway Cargo project as subprocesses.
"""

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

# --------------------------------------------------------------------------------------------
# Pinned sources
# --------------------------------------------------------------------------------------------

CHITCHAT = {
    "name": "chitchat-dataset",
    "version": "0.9.0",
    "archive": "chitchat_dataset-0.9.0-py3-none-any.whl",
    "sha256": "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e",
    "data_path": "chitchat_dataset/dataset.json",
    "license_path": "chitchat_dataset-0.9.0.dist-info/LICENSE",
    "license": "MIT",
    "homepage": "https://github.com/BYU-PCCL/chitchat-dataset",
}
CHATTERBOT = {
    "name": "chatterbot-corpus",
    "version": "1.3.3",
    # The sdist, not the wheel: only the sdist carries the licence text (license.md). Its data
    # files are identical to the wheel's.
    "archive": "chatterbot_corpus-1.3.3.tar.gz",
    "sha256": "615b5c4c605154f60ae51d03ed918ed92e9d32bc2b144b759bbc64ecdbe18481",
    "root": "chatterbot_corpus-1.3.3/",
    "data_dir": "chatterbot_corpus/data/",
    "license_path": "license.md",
    "license": "BSD-3-Clause",
    "homepage": "https://github.com/gunthercox/chatterbot-corpus",
}
TANAKA = {
    "name": "tanaka",
    "version": "0.1.0",
    # crates.io checksum of tanaka-0.1.0.crate (cargo verifies it; we check Cargo.lock says so)
    "crate_sha256": "83f3382f485594050b033ede3d025f84c69eb9a6bf08a063087914eeb7e0982c",
    "data_path": "examples.utf.xz",
    "data_sha256": "5be1831f6d9a2c11c60972c249d3ae464e3e99316f5341fe97b395b84b87b1ad",
    "license_note_path": "DATA.md",
    "license": "CC BY 2.0 FR",
    "license_url": "https://creativecommons.org/licenses/by/2.0/fr/",
    "license_url_en": "https://creativecommons.org/licenses/by/2.0/fr/deed.en",
    "crate_code_license": "MIT OR Apache-2.0",
    "homepage": "https://gitlab.com/johngavingraham/tanaka",
    "corpus_page": "https://www.edrdg.org/wiki/index.php/Tanaka_Corpus",
}

HERE = os.path.dirname(os.path.abspath(__file__))


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(cmd, cwd=None, env=None):
    log("+ " + " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout.decode("utf-8", "replace"))
        sys.stderr.write(proc.stderr.decode("utf-8", "replace"))
        raise SystemExit("command failed (exit %d): %s" % (proc.returncode, " ".join(cmd)))
    return proc.stdout.decode("utf-8")


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------


def pip_download(source, dest, binary):
    path = os.path.join(dest, source["archive"])
    if not os.path.exists(path):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", dest, "%s==%s" % (source["name"], source["version"])]
        cmd += ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
        run(cmd)
    if not os.path.exists(path):
        raise SystemExit("pip did not produce %s in %s" % (source["archive"], dest))
    digest = sha256_file(path)
    if digest != source["sha256"]:
        raise SystemExit("%s: sha256 %s, expected %s" % (path, digest, source["sha256"]))
    return path


def cargo_fetch_tanaka(workdir):
    """Fetch the tanaka crate through cargo and return its unpacked source directory."""
    proj = os.path.join(workdir, "tanaka-fetch")
    os.makedirs(os.path.join(proj, "src"), exist_ok=True)
    with open(os.path.join(proj, "Cargo.toml"), "w") as f:
        f.write('[package]\nname = "tanaka-fetch"\nversion = "0.0.0"\nedition = "2021"\n'
                'publish = false\n\n[workspace]\n\n[dependencies]\ntanaka = "=%s"\n'
                % TANAKA["version"])
    with open(os.path.join(proj, "src", "lib.rs"), "w") as f:
        f.write("")
    env = dict(os.environ)
    env.pop("CARGO_TARGET_DIR", None)
    run(["cargo", "fetch", "--manifest-path", os.path.join(proj, "Cargo.toml")], env=env)
    meta = json.loads(run(["cargo", "metadata", "--format-version", "1", "--offline",
                           "--manifest-path", os.path.join(proj, "Cargo.toml")], env=env))
    pkgs = [p for p in meta["packages"] if p["name"] == "tanaka"]
    if len(pkgs) != 1 or pkgs[0]["version"] != TANAKA["version"]:
        raise SystemExit("cargo metadata did not resolve tanaka %s" % TANAKA["version"])
    with open(os.path.join(proj, "Cargo.lock")) as f:
        lock = f.read()
    m = re.search(r'name = "tanaka"\nversion = "([^"]+)"\nsource = "([^"]+)"\nchecksum = "([0-9a-f]+)"',
                  lock)
    if not m or m.group(1) != TANAKA["version"] or m.group(3) != TANAKA["crate_sha256"]:
        raise SystemExit("Cargo.lock: unexpected tanaka entry %r" % (m and m.groups(),))
    return os.path.dirname(pkgs[0]["manifest_path"])


# --------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------

# Zero-width characters that machine translation left inside words (U+200B in chatterbot's
# Japanese: "言\u200b\u200bえば"), and the BOM. ZWJ/ZWNJ are kept: emoji and some scripts need them.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u2060\ufeff"))


def clean_text(s):
    s = s.replace("\r\n", "\n").replace("\r", "\n").translate(_INVISIBLE)
    return s.strip()


def to_chat(turns):
    """turns: [(role, text)] in order. Drops empty turns, merges consecutive turns of one role
    with "\\n", drops leading assistant and trailing user turns. Returns [] if fewer than 2."""
    merged = []
    for role, text in turns:
        text = clean_text(text)
        if not text:
            continue
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] += "\n" + text
        else:
            merged.append({"role": role, "content": text})
    while merged and merged[0]["role"] != "user":
        merged.pop(0)
    while merged and merged[-1]["role"] != "assistant":
        merged.pop()
    return merged if len(merged) >= 2 else []


def dumps(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def write_gzip(path, data):
    """Deterministic gzip: no file name, mtime 0, level 9."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    out = buf.getvalue()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(out)
    os.replace(tmp, path)
    return out


# --------------------------------------------------------------------------------------------
# chitchat-dataset
# --------------------------------------------------------------------------------------------


def build_chitchat(wheel):
    with zipfile.ZipFile(wheel) as z:
        raw = z.read(CHITCHAT["data_path"])
        license_text = z.read(CHITCHAT["license_path"]).decode("utf-8")
    dataset = json.loads(raw.decode("utf-8"))
    drop = {"one_speaker": 0, "too_short": 0, "duplicate": 0}
    examples, seen = [], set()
    for cid in sorted(dataset):
        conv = dataset[cid]
        msgs = [m for group in conv.get("messages") or [] for m in group]
        senders = []
        for m in msgs:
            if m["sender"] not in senders:
                senders.append(m["sender"])
        if len(senders) != 2:
            # 3,150 of the 7,168 logs hold one participant only (nobody answered); no dialogue.
            drop["one_speaker"] += 1
            continue
        first = None
        turns = []
        for m in msgs:
            text = m.get("text") or ""
            if first is None and clean_text(text):
                first = m["sender"]
            if first is None:
                continue
            turns.append(("user" if m["sender"] == first else "assistant", text))
        messages = to_chat(turns)
        if not messages:
            drop["too_short"] += 1
            continue
        key = dumps(messages)
        if key in seen:
            drop["duplicate"] += 1
            continue
        seen.add(key)
        meta = {"id": "chitchat-" + cid, "source": "chitchat-dataset==%s" % CHITCHAT["version"],
                "language": "en"}
        prompt = clean_text(conv.get("prompt") or "")
        if prompt:
            # The conversation starter both people were shown (the topic). Kept as metadata, not
            # turned into a system prompt.
            meta["prompt"] = prompt
        examples.append({"messages": messages, "meta": meta})
    return examples, drop, len(dataset), license_text


def chitchat_extra(examples):
    prompts = {e["meta"].get("prompt") for e in examples} - {None}
    non_ascii = sum(1 for e in examples for m in e["messages"] for ch in m["content"] if ord(ch) > 127)
    return {"distinct_prompts": len(prompts),
            "with_prompt": sum(1 for e in examples if "prompt" in e["meta"]),
            "non_ascii_characters": non_ascii}


# --------------------------------------------------------------------------------------------
# chatterbot-corpus: a small YAML reader for its layout (standard library only)
# --------------------------------------------------------------------------------------------
#
# The files look like
#
#   categories:
#   - greetings
#   conversations:
#   - - Hello
#     - Hi there!
#   - - Tell me a joke
#     - |
#       block scalar ...
#
# The reader handles plain (multi-line), single- and double-quoted and block (| >) scalars and
# comments, and it never resolves types: every value is text, so an entry such as `- yes`,
# `- 1984`, `- null` or `- 1:30` stays that text (a YAML 1.1 loader would turn them into a
# bool, an int, None and the sexagesimal int 90). It also repairs one known mistake: an entry
# written `- question` (one dash) followed by `  - answer` lines is read as the conversation
# [question, answer] (a YAML loader folds the answer into the question as one string).


class YamlError(ValueError):
    pass


def _indent(line):
    return len(line) - len(line.lstrip(" "))


def _fold(lines):
    """YAML line folding for flow and plain scalars: lines are trimmed; one line break becomes a
    space, n > 1 breaks (n - 1 empty lines) become n - 1 newlines."""
    out, breaks = "", 0
    for i, ln in enumerate(lines):
        ln = ln.strip(" \t") if i else ln.rstrip(" \t")
        if i == 0:
            out = ln
            continue
        if not ln:
            breaks += 1
            continue
        out += "\n" * breaks if breaks else " "
        breaks = 0
        out += ln
    return out


def _strip_comment(s):
    """Removes a ` # comment` from a plain scalar."""
    m = re.search(r"(^|[ \t])#", s)
    return s[: m.start()] if m else s


def _quoted(first, lines, pos, quote):
    """Reads a quoted scalar starting with `first` (after the quote char). Returns (text, pos)."""
    parts = [first]
    while True:
        joined = "\n".join(parts)
        end = _find_close(joined, quote)
        if end is not None:
            body, rest = joined[:end], joined[end + 1:]
            if _strip_comment(rest).strip():
                raise YamlError("text after closing quote: %r" % rest)
            break
        if pos >= len(lines):
            raise YamlError("unterminated quoted scalar")
        parts.append(lines[pos])
        pos += 1
    if quote == "'":
        segs = body.split("\n")
        return _fold(segs).replace("''", "'"), pos
    return _dq_unescape(body), pos


def _find_close(s, quote):
    i = 0
    while i < len(s):
        c = s[i]
        if quote == "'" and c == "'":
            if i + 1 < len(s) and s[i + 1] == "'":
                i += 2
                continue
            return i
        if quote == '"':
            if c == "\\":
                i += 2
                continue
            if c == '"':
                return i
        i += 1
    return None


_DQ_ESC = {"0": "\0", "a": "\a", "b": "\b", "t": "\t", "\t": "\t", "n": "\n", "v": "\v",
           "f": "\f", "r": "\r", "e": "\x1b", " ": " ", '"': '"', "/": "/", "\\": "\\",
           "N": "\x85", "_": "\xa0", "L": "\u2028", "P": "\u2029"}


def _dq_unescape(body):
    # Fold first (escaped line breaks join without space), then unescape.
    lines = body.split("\n")
    out = []
    for i, ln in enumerate(lines):
        if i:
            ln = ln.lstrip(" \t")
        if i < len(lines) - 1:
            if ln.endswith("\\") and not ln.endswith("\\\\"):
                out.append(ln[:-1])
                out.append("\x00JOIN\x00")
                continue
            ln = ln.rstrip(" \t")
        out.append(ln)
    # Rebuild with folding rules
    text, breaks, join = "", 0, False
    for i, ln in enumerate(out):
        if ln == "\x00JOIN\x00":
            join = True
            continue
        if i == 0:
            text = ln
            continue
        if join:
            text += ln
            join = False
            continue
        if ln == "" and i != len(out) - 1:
            breaks += 1
            continue
        text += ("\n" * breaks) if breaks else " "
        breaks = 0
        text += ln
    res, i = [], 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            res.append(c)
            i += 1
            continue
        n = text[i + 1] if i + 1 < len(text) else ""
        if n in _DQ_ESC:
            res.append(_DQ_ESC[n])
            i += 2
        elif n in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[n]
            res.append(chr(int(text[i + 2: i + 2 + width], 16)))
            i += 2 + width
        else:
            raise YamlError("bad escape \\%s" % n)
    return "".join(res)


def _block(header, lines, pos, parent_indent):
    """Reads a block scalar (| or >) whose header is `header`. Returns (text, pos)."""
    m = re.fullmatch(r"([|>])([+-]?)([1-9]?)([+-]?)(?:[ \t]+#.*)?[ \t]*", header)
    if not m:
        raise YamlError("bad block scalar header %r" % header)
    style, chomp, width = m.group(1), m.group(2) or m.group(4), m.group(3)
    content_indent = parent_indent + int(width) if width else None
    body = []
    while pos < len(lines):
        ln = lines[pos]
        if not ln.strip(" "):
            body.append("")
            pos += 1
            continue
        ind = _indent(ln)
        if content_indent is None:
            if ind <= parent_indent:
                break
            content_indent = ind
        if ind < content_indent:
            break
        body.append(ln[content_indent:])
        pos += 1
    # trailing blank lines belong to chomping
    trail = 0
    while body and body[-1] == "":
        body.pop()
        trail += 1
    if style == "|":
        text = "\n".join(body)
    else:
        text, prev_more, empties = "", None, 0
        for ln in body:
            if ln == "":
                empties += 1
                continue
            more = ln.startswith((" ", "\t"))
            if prev_more is None:
                text += "\n" * empties + ln
            elif not more and not prev_more:
                text += ("\n" * empties if empties else " ") + ln
            else:
                text += "\n" * (empties + 1) + ln
            prev_more, empties = more, 0
    if body:
        if chomp == "-":
            pass
        elif chomp == "+":
            text += "\n" * (trail + 1)
        else:
            text += "\n"
    elif chomp == "+":
        text = "\n" * trail
    return text, pos


def _scalar(value, lines, pos, parent_indent):
    """Parses the scalar that starts as `value` (rest of the line after '- ' or 'key: ')."""
    v = value.strip(" \t")
    if v.startswith(("|", ">")):
        return _block(v, lines, pos, parent_indent)
    if v.startswith("'") or v.startswith('"'):
        return _quoted(v[1:], lines, pos, v[0])
    if v.startswith("#"):
        v = ""
    first = _strip_comment(v)
    parts = [first]
    if first != v:  # a comment ends a plain scalar
        return first.strip(), pos
    while pos < len(lines):
        ln = lines[pos]
        if ln.strip(" \t") and (_indent(ln) <= parent_indent or ln.lstrip(" ").startswith("#")):
            break
        stripped = ln.strip(" \t")
        if stripped and _indent(ln) <= parent_indent + 2 and re.match(r"-( |$)", stripped):
            break  # a sequence entry, never a continuation (see the note above)
        c = _strip_comment(stripped)
        parts.append(c)
        pos += 1
        if c != stripped:
            break
    while len(parts) > 1 and parts[-1] == "":
        parts.pop()
    return _fold(parts), pos


def _short(s, n=40):
    return s if len(s) <= n else s[:n].rstrip() + "..."


def _flow_seq(v):
    inner = v.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        raise YamlError("unsupported value %r" % v)
    items = [x.strip() for x in inner[1:-1].split(",")]
    return [x[1:-1] if len(x) >= 2 and x[0] == x[-1] and x[0] in "'\"" else x for x in items if x]


def parse_chatterbot_yaml(text):
    """Returns (categories, conversations, repairs): conversations are lists of strings."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    section, categories, conversations, repairs = None, [], [], []
    pos = 0
    while pos < len(lines):
        ln = lines[pos]
        lineno = pos + 1
        pos += 1
        stripped = ln.strip(" \t")
        if not stripped or stripped.startswith("#") or stripped in ("---", "..."):
            continue
        ind = _indent(ln)
        m = re.match(r"([A-Za-z_]+):(?:[ \t]+(.*))?$", ln)
        if ind == 0 and m:
            section = m.group(1)
            rest = (m.group(2) or "").strip()
            if rest and not rest.startswith("#"):
                if section != "categories":
                    raise YamlError("line %d: unexpected inline value" % lineno)
                categories.extend(_flow_seq(rest))
            continue
        if section == "categories":
            mm = re.match(r"( *)-(?: +(.*))?$", ln)
            if not mm:
                raise YamlError("line %d: expected a category entry" % lineno)
            val, pos = _scalar(mm.group(2) or "", lines, pos, len(mm.group(1)))
            categories.append(val)
        elif section == "conversations":
            mm = re.match(r"( *)-( +)-(?: +(.*))?$", ln)  # `- - first`
            if mm:
                item_indent = len(mm.group(1)) + 1 + len(mm.group(2))
                val, pos = _scalar(mm.group(3) or "", lines, pos, item_indent)
                conversations.append([val])
                continue
            mm = re.match(r"( *)-(?: +(.*))?$", ln)
            if not mm:
                raise YamlError("line %d: expected a conversation entry: %r" % (lineno, ln))
            dash = len(mm.group(1))
            if dash == 0:
                # `- first` with one dash: a conversation whose first entry lost its `- `.
                repairs.append("line %d: `- %s` has one dash where `- - ` starts a conversation; "
                               "read as a conversation's first entry"
                               % (lineno, _short(mm.group(2) or "")))
                val, pos = _scalar(mm.group(2) or "", lines, pos, 2)
                conversations.append([val])
                continue
            if not conversations:
                raise YamlError("line %d: entry before any conversation" % lineno)
            val, pos = _scalar(mm.group(2) or "", lines, pos, dash)
            conversations[-1].append(val)
        else:
            raise YamlError("line %d: content outside a known section: %r" % (lineno, ln))
    return categories, conversations, repairs


def build_chatterbot(sdist):
    files, license_text = {}, None
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            rel = member.name[len(CHATTERBOT["root"]):] if member.name.startswith(CHATTERBOT["root"]) else None
            if rel is None:
                continue
            if rel == CHATTERBOT["license_path"]:
                license_text = tar.extractfile(member).read().decode("utf-8")
            for lang in ("english", "japanese"):
                prefix = CHATTERBOT["data_dir"] + lang + "/"
                if rel.startswith(prefix) and rel.endswith(".yml"):
                    files[rel] = (lang, tar.extractfile(member).read().decode("utf-8"))
    if license_text is None:
        raise SystemExit("no %s in %s" % (CHATTERBOT["license_path"], sdist))
    out = {"english": [], "japanese": []}
    drop = {"english": {"too_short": 0, "duplicate": 0}, "japanese": {"too_short": 0, "duplicate": 0}}
    repairs, counts, seen = [], {"english": 0, "japanese": 0}, {"english": set(), "japanese": set()}
    nfiles = {"english": 0, "japanese": 0}
    dup_by_file = {"english": {}, "japanese": {}}
    in_by_file = {}
    for rel in sorted(files):
        lang, text = files[rel]
        nfiles[lang] += 1
        categories, conversations, fixes = parse_chatterbot_yaml(text)
        repairs += ["%s %s" % (rel, f) for f in fixes]
        stem = os.path.splitext(os.path.basename(rel))[0]
        in_by_file[rel] = len(conversations)
        for i, conv in enumerate(conversations):
            counts[lang] += 1
            turns = [("user" if j % 2 == 0 else "assistant", t) for j, t in enumerate(conv)]
            messages = to_chat(turns)
            if not messages:
                drop[lang]["too_short"] += 1
                continue
            key = dumps(messages)
            if key in seen[lang]:
                drop[lang]["duplicate"] += 1
                dup_by_file[lang][rel] = dup_by_file[lang].get(rel, 0) + 1
                continue
            seen[lang].add(key)
            code = "en" if lang == "english" else "ja"
            out[lang].append({"messages": messages, "meta": {
                "id": "chatterbot-%s-%s-%d" % (code, stem, i),
                "source": "chatterbot-corpus==%s" % CHATTERBOT["version"],
                "language": code,
                "file": rel,
                "categories": [clean_text(c) for c in categories],
            }})
    for lang in drop:
        drop[lang]["duplicate_by_file"] = dup_by_file[lang]
    return out, drop, counts, nfiles, repairs, license_text, in_by_file


# --------------------------------------------------------------------------------------------
# tanaka
# --------------------------------------------------------------------------------------------


def build_tanaka(crate_dir):
    path = os.path.join(crate_dir, TANAKA["data_path"])
    digest = sha256_file(path)
    if digest != TANAKA["data_sha256"]:
        raise SystemExit("%s: sha256 %s, expected %s" % (path, digest, TANAKA["data_sha256"]))
    with lzma.open(path, "rb") as f:
        text = f.read().decode("utf-8")
    with open(os.path.join(crate_dir, TANAKA["license_note_path"]), encoding="utf-8") as f:
        data_md = f.read()
    pairs, seen = [], set()
    stats = {"a_lines": 0, "duplicate": 0, "empty": 0}
    for line in text.split("\n"):
        if not line.startswith("A: "):
            continue  # B: index lines, '#' comment lines
        stats["a_lines"] += 1
        body = line[3:]
        ja, sep, en = body.partition("\t")
        en = re.sub(r"#ID=[0-9_]+\s*$", "", en)
        ja = " ".join(clean_text(ja).split("\t"))
        en = " ".join(clean_text(en).split("\t"))
        if not sep or not ja or not en:
            stats["empty"] += 1
            continue
        if (ja, en) in seen:
            stats["duplicate"] += 1
            continue
        seen.add((ja, en))
        pairs.append((ja, en))
    return pairs, stats, data_md


# --------------------------------------------------------------------------------------------
# Stats, licences, card
# --------------------------------------------------------------------------------------------


def chat_stats(examples, lang):
    turns = sum(len(e["messages"]) for e in examples)
    chars = sum(len(m["content"]) for e in examples for m in e["messages"])
    return {
        "conversations": len(examples),
        "turns": turns,
        "user_turns": sum(1 for e in examples for m in e["messages"] if m["role"] == "user"),
        "assistant_turns": sum(1 for e in examples for m in e["messages"] if m["role"] == "assistant"),
        "characters": {lang: chars},
    }


def human(n):
    return "{:,}".format(n)


def write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def license_files(lic_dir, chitchat_license, chatterbot_license, tanaka_data_md):
    os.makedirs(lic_dir, exist_ok=True)
    write_text(os.path.join(lic_dir, "chitchat-dataset.txt"),
               "chitchat-dataset %s - licence: MIT\n"
               "Copied verbatim from %s inside the wheel %s (PyPI).\n"
               "Project: %s\n\n%s"
               % (CHITCHAT["version"], CHITCHAT["license_path"], CHITCHAT["archive"],
                  CHITCHAT["homepage"], chitchat_license))
    write_text(os.path.join(lic_dir, "chatterbot-corpus.txt"),
               "chatterbot-corpus %s - licence: BSD-3-Clause\n"
               "Copied verbatim from %s inside the sdist %s (PyPI); the wheel carries no licence file.\n"
               "Project: %s\n\n%s"
               % (CHATTERBOT["version"], CHATTERBOT["license_path"], CHATTERBOT["archive"],
                  CHATTERBOT["homepage"], chatterbot_license))
    m = re.search(r"## License\n(.*?)(?=\n## )", tanaka_data_md, re.S)
    section = m.group(1).strip() if m else "(no License section found in DATA.md)"
    refs = "\n".join(l for l in tanaka_data_md.splitlines() if re.match(r"\[[34]\]: ", l))
    write_text(os.path.join(lic_dir, "tanaka.txt"),
               "Tanaka Corpus (as shipped in the crates.io crate tanaka %s, file %s)\n"
               "Data licence: Creative Commons Attribution 2.0 France (CC BY 2.0 FR)\n"
               "  %s\n  %s (English)\n\n"
               "The crate carries no copy of the licence's legal text; this file gives its name and\n"
               "address. What the crate says about the data, verbatim from its DATA.md:\n\n"
               "> %s\n>\n%s\n\n"
               "Attribution: the Tanaka Corpus was compiled by Professor Yasuhito Tanaka (Hyogo\n"
               "University) and his students; it is maintained as part of the Tatoeba project\n"
               "(https://tatoeba.org) and distributed by the EDRDG (%s).\n"
               "Changes made for kaiwa: only A: lines used (B: index lines dropped), the #ID= suffix\n"
               "removed, surrounding whitespace trimmed, exact duplicate pairs removed.\n\n"
               "The crate's own code is licensed %s; that licence does not cover the corpus data.\n"
               % (TANAKA["version"], TANAKA["data_path"], TANAKA["license_url"],
                  TANAKA["license_url_en"], section.replace("\n", "\n> "),
                  "\n".join("> " + l for l in refs.splitlines()), TANAKA["corpus_page"],
                  TANAKA["crate_code_license"]))


CARD = """# kaiwa starter corpus

Generated by `python3 data/build_starter.py` (standard library only; it runs `pip download` and
`cargo fetch`). Do not edit by hand: change the script and rebuild. Every number below comes from
[`starter/stats.json`](starter/stats.json), which the same run writes.

**No package registry carries real Japanese dialogue.** The only Japanese *conversations* here are
ChatterBot's small, machine-translated Q/A set (`chatterbot_ja`, {ja_conv} conversations), kept as
format examples and evaluation material. The Japanese bulk is *sentence text* (Tanaka Corpus
pairs), not conversation. The real human dialogue (`chitchat_en`) is English only.

## Files

| file | what | lines | turns | characters | size |
| --- | --- | ---: | ---: | ---: | ---: |
{table}

Characters are Unicode code points of message text (JSONL files; role names and JSON syntax not
counted) or of the two sentence columns (TSV). A file's characters are counted under its
language; ChatterBot's Japanese contains some Latin words (Python, NASA, ...), counted as `ja`.

**Totals.** Dialogue: {tot_conv} conversations, {tot_turns} turns. Characters: English {tot_en}
({dlg_en} in dialogue, {tan_en} in Tanaka), Japanese {tot_ja} ({dlg_ja} in dialogue, {tan_ja} in
Tanaka). All files together: {tot_bytes} bytes compressed.

### Format

`*.jsonl.gz`: one conversation per line, OpenAI chat format plus a `meta` object (the same shape
as `kaiwa export-corpus` writes; readers that only know `messages` ignore it):

```json
{example}
```

Every line starts with a `user` turn, alternates `user`/`assistant` and ends with an `assistant`
turn; there is no system prompt. `tanaka_ja_en.tsv.gz`: `japanese<TAB>english`, one pair a line,
UTF-8, `\\n` line ends, no header.

## Sources and processing

### chitchat_en.jsonl.gz: real English small talk

* Source: PyPI `chitchat-dataset` {cc_version}, file `{cc_path}` inside the wheel `{cc_archive}`
  (sha256 `{cc_sha}`). BYU PCC lab's Chit-Chat Challenge (2018), {cc_home}.
* Licence: MIT, text in [`licenses/chitchat-dataset.txt`](licenses/chitchat-dataset.txt).
* Two people chatting freely, usually from a suggested starter question ({cc_nprompts} distinct
  ones: hypotheticals such as "What if pigs could fly?", computers and AI, superpowers, films,
  heroes, ...; {cc_with_prompt} of the {cc_kept} kept conversations have one). The question is kept
  as `meta.prompt`; it is not made into a system prompt. There are no other topic labels.
* Processing: the first person to write becomes `user`, the other `assistant`; each person's
  consecutive messages are joined with `\\n`; a trailing `user` turn is dropped; empty messages
  dropped. Of {cc_total} logs, {cc_one} hold only one participant (nobody answered) and are dropped,
  {cc_short} had no user->assistant exchange left, {cc_dup} were exact duplicates: {cc_kept} remain.
  Ordered by the conversation's UUID (`meta.id`).
* The text is as typed: casual, lower case, typos. {cc_ascii}

### chatterbot_en.jsonl.gz / chatterbot_ja.jsonl.gz: ChatterBot's Q/A sets

* Source: PyPI `chatterbot-corpus` {cb_version}, `{cb_dir}english/*.yml` ({cb_nfiles_en} files) and
  `{cb_dir}japanese/*.yml` ({cb_nfiles_ja} files) inside the sdist `{cb_archive}` (sha256
  `{cb_sha}`; the wheel's data files are identical, but only the sdist carries the licence). {cb_home}.
* Licence: BSD-3-Clause, text in [`licenses/chatterbot-corpus.txt`](licenses/chatterbot-corpus.txt).
* Written by contributors as bot training data: mostly one question and one answer about the bot
  itself (AI, emotions, jokes, trivia); the English also has long `coding` (answers with code
  blocks) and `tech_support` sets. **The Japanese is machine-translated from the English** and reads like it (literal,
  stiff, often あなたは/私は on every sentence, some answers that no longer fit the question). Use it as format examples
  and evaluation material, not as a model of natural Japanese.
* Processing: entries of each YAML list alternate `user`, `assistant`, starting with `user`; empty
  entries dropped, lists left with fewer than 2 turns skipped ({cb_short_en} en, {cb_short_ja} ja),
  exact duplicate conversations dropped ({cb_dup_en} en, {cb_dup_ja} ja): {cb_dup_note}. `meta` keeps the YAML file and its categories.
  Files in name order, conversations in file order.
* Breakage handled: the YAML is read by the script's own reader, which keeps every value as text
  (a YAML 1.1 loader would turn entries such as `yes`, `no`, `1984`, `null` or `1:30` into a bool,
  an int, None or 90; in {cb_version} PyYAML does read every en/ja entry as a string, since numbers
  such as `'1984'` are quoted, but the script does not depend on that). The machine translation left zero-width spaces (U+200B)
  inside Japanese words (`言\\u200b\\u200bえば`); they are removed (from all sources). {cb_repairs}

### tanaka_ja_en.tsv.gz: Japanese-English sentence pairs (pre-training text)

* Source: crates.io `tanaka` {tk_version} (crate sha256 `{tk_crate_sha}`, fetched with
  `cargo fetch`), file `{tk_path}` inside the crate (sha256 `{tk_sha}`): the Tanaka Corpus in
  the WWWJDIC `examples.utf` format, `A: 日本語<TAB>English#ID=n_m` lines, each followed by a
  `B:` line of dictionary index words.
* Licence: the data is CC BY 2.0 FR (Creative Commons Attribution 2.0 France,
  {tk_lic_url}), as the crate's `DATA.md` states; the crate has no copy of the legal text, so
  [`licenses/tanaka.txt`](licenses/tanaka.txt) names it, links it and quotes `DATA.md`. Attribution:
  Tanaka Corpus (Yasuhito Tanaka et al.), Tatoeba project, EDRDG. The crate's code licence
  ({tk_code_lic}) does not apply to the data.
* Processing: `A:` lines only; the `#ID=` suffix is stripped; surrounding whitespace trimmed;
  exact duplicate pairs dropped ({tk_dup} of {tk_a}); file order kept (it is grouped by head word,
  so shuffle before training). Short example sentences (average {tk_avg_ja} Japanese characters);
  the English is a translation, not always a literal one.
* {tk_size_note}

## Rebuilding

```sh
python3 data/build_starter.py                  # needs python3 with pip, and cargo; network to PyPI and crates.io
python3 data/build_starter.py --downloads DIR  # keep the downloaded archives in DIR and reuse them
```

The sources are pinned (versions and SHA-256s in the script); a rebuild gives the same bytes
(gzip mtime 0, no file name, fixed order) with the same Python/zlib. `stats.json` also records the
SHA-256 of each file's uncompressed content, which does not depend on the zlib build.

Total size of `data/` (script, card, licences, corpus): about {du_total}.
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--downloads", help="keep downloaded archives here (and reuse them)")
    ap.add_argument("--out", default=HERE, help="the data/ directory (default: this script's)")
    args = ap.parse_args()

    out_dir = os.path.abspath(args.out)
    starter = os.path.join(out_dir, "starter")
    os.makedirs(starter, exist_ok=True)
    work = tempfile.mkdtemp(prefix="kaiwa-starter-")
    try:
        dl = os.path.abspath(args.downloads) if args.downloads else os.path.join(work, "dl")
        os.makedirs(dl, exist_ok=True)
        chitchat_whl = pip_download(CHITCHAT, dl, binary=True)
        chatterbot_sdist = pip_download(CHATTERBOT, dl, binary=False)
        crate_dir = cargo_fetch_tanaka(work)

        log("chitchat-dataset ...")
        cc_examples, cc_drop, cc_total, cc_license = build_chitchat(chitchat_whl)
        log("chatterbot-corpus ...")
        cb_out, cb_drop, cb_counts, cb_nfiles, cb_repairs, cb_license, cb_in_by_file = build_chatterbot(chatterbot_sdist)
        log("tanaka ...")
        tk_pairs, tk_stats, tk_data_md = build_tanaka(crate_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    files = {}

    def emit_jsonl(name, examples, lang, extra):
        raw = "".join(dumps(e) + "\n" for e in examples).encode("utf-8")
        gz = write_gzip(os.path.join(starter, name), raw)
        st = chat_stats(examples, lang)
        st.update(extra)
        st.update({"bytes_gz": len(gz), "bytes_raw": len(raw), "sha256_gz": sha256_bytes(gz),
                   "sha256_raw": sha256_bytes(raw)})
        files[name] = st

    emit_jsonl("chitchat_en.jsonl.gz", cc_examples, "en", {
        "language": "en", "kind": "dialogue (real, human-human)",
        "source": {"registry": "PyPI", "package": CHITCHAT["name"], "version": CHITCHAT["version"],
                   "archive": CHITCHAT["archive"], "archive_sha256": CHITCHAT["sha256"],
                   "path": CHITCHAT["data_path"], "license": CHITCHAT["license"]},
        "input_conversations": cc_total, "dropped": cc_drop, **chitchat_extra(cc_examples)})
    for lang, code in (("english", "en"), ("japanese", "ja")):
        emit_jsonl("chatterbot_%s.jsonl.gz" % code, cb_out[lang], code, {
            "language": code,
            "kind": "dialogue (bot Q/A, written)" if code == "en"
                    else "dialogue (bot Q/A, machine-translated from English)",
            "source": {"registry": "PyPI", "package": CHATTERBOT["name"],
                       "version": CHATTERBOT["version"], "archive": CHATTERBOT["archive"],
                       "archive_sha256": CHATTERBOT["sha256"],
                       "path": CHATTERBOT["data_dir"] + lang + "/*.yml",
                       "files": cb_nfiles[lang], "license": CHATTERBOT["license"]},
            "input_conversations": cb_counts[lang], "dropped": cb_drop[lang],
            "repairs": [r for r in cb_repairs if "/%s/" % lang in r]})

    raw = "".join("%s\t%s\n" % p for p in tk_pairs).encode("utf-8")
    gz = write_gzip(os.path.join(starter, "tanaka_ja_en.tsv.gz"), raw)
    files["tanaka_ja_en.tsv.gz"] = {
        "language": "ja+en", "kind": "parallel sentences (not dialogue)",
        "pairs": len(tk_pairs),
        "characters": {"ja": sum(len(j) for j, _ in tk_pairs), "en": sum(len(e) for _, e in tk_pairs)},
        "source": {"registry": "crates.io", "package": TANAKA["name"], "version": TANAKA["version"],
                   "crate_sha256": TANAKA["crate_sha256"], "path": TANAKA["data_path"],
                   "path_sha256": TANAKA["data_sha256"], "license": TANAKA["license"],
                   "license_url": TANAKA["license_url"]},
        "input_pairs": tk_stats["a_lines"],
        "dropped": {"duplicate": tk_stats["duplicate"], "empty": tk_stats["empty"]},
        "bytes_gz": len(gz), "bytes_raw": len(raw), "sha256_gz": sha256_bytes(gz),
        "sha256_raw": sha256_bytes(raw)}

    dialogue = [files[n] for n in ("chitchat_en.jsonl.gz", "chatterbot_en.jsonl.gz", "chatterbot_ja.jsonl.gz")]
    dlg_en = sum(f["characters"].get("en", 0) for f in dialogue)
    dlg_ja = sum(f["characters"].get("ja", 0) for f in dialogue)
    tk = files["tanaka_ja_en.tsv.gz"]
    totals = {
        "dialogue_conversations": sum(f["conversations"] for f in dialogue),
        "dialogue_turns": sum(f["turns"] for f in dialogue),
        "dialogue_characters": {"en": dlg_en, "ja": dlg_ja},
        "sentence_pairs": tk["pairs"],
        "sentence_characters": dict(tk["characters"]),
        "characters": {"en": dlg_en + tk["characters"]["en"], "ja": dlg_ja + tk["characters"]["ja"]},
        "bytes_gz": sum(f["bytes_gz"] for f in files.values()),
    }
    stats = {"generator": "data/build_starter.py", "files": files, "totals": totals}
    write_text(os.path.join(starter, "stats.json"),
               json.dumps(stats, ensure_ascii=False, indent=2, sort_keys=True) + "\n")

    license_files(os.path.join(out_dir, "licenses"), cc_license, cb_license, tk_data_md)

    # ---- the card
    def row(name, what):
        f = files[name]
        if "pairs" in f:
            lines, turns = "%s pairs" % human(f["pairs"]), "-"
            chars = "ja %s, en %s" % (human(f["characters"]["ja"]), human(f["characters"]["en"]))
        else:
            lines, turns = "%s conversations" % human(f["conversations"]), human(f["turns"])
            (lang, n), = f["characters"].items()
            chars = "%s %s" % (lang, human(n))
        return "| [`starter/%s`](starter/%s) | %s | %s | %s | %s | %s |" % (
            name, name, what, lines, turns, chars, mb(f["bytes_gz"]))

    def mb(n):
        return "%.2f MB" % (n / 1e6) if n >= 100000 else "%.1f kB" % (n / 1e3)

    table = "\n".join([
        row("chitchat_en.jsonl.gz", "English dialogue, real people (MIT)"),
        row("chatterbot_en.jsonl.gz", "English bot Q/A (BSD-3-Clause)"),
        row("chatterbot_ja.jsonl.gz", "Japanese bot Q/A, machine-translated (BSD-3-Clause)"),
        row("tanaka_ja_en.tsv.gz", "Japanese-English sentence pairs, not dialogue (CC BY 2.0 FR)"),
    ])
    example = next(e for e in cb_out["japanese"] if len(e["messages"]) == 2
                   and "meta" in e and e["meta"]["file"].endswith("greetings.yml"))
    example = dumps(example)
    fixed_size = sum(os.path.getsize(os.path.join(starter, n)) for n in files)
    tk_size_note = ("Size: %s compressed (%s uncompressed), the largest file here; kept whole."
                    % (mb(tk["bytes_gz"]), mb(tk["bytes_raw"])))
    rep = cb_repairs
    repairs_txt = ("Malformed entries repaired: %s (a YAML loader would fold the answer lines "
                   "into the question as one string)." % "; ".join(rep)) if rep else ""
    def dup_note(lang):
        by_file = cb_drop[lang]["duplicate_by_file"]
        parts = []
        for f, n in sorted(by_file.items(), key=lambda kv: (-kv[1], kv[0]))[:2]:
            total_in = cb_in_by_file[f]
            parts.append("%s of the %s conversations in `%s` %s"
                         % (human(n), human(total_in), os.path.basename(f),
                            "is an exact repeat" if n == 1 else "are exact repeats"))
        return "; ".join(parts) if parts else "none"

    cb_dup_note = "en: " + dup_note("english") + "; ja: " + dup_note("japanese")
    cc = files["chitchat_en.jsonl.gz"]

    def data_size():
        total = 0
        for root, dirs, names in os.walk(out_dir):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            total += sum(os.path.getsize(os.path.join(root, n)) for n in names if not n.endswith(".tmp"))
        return total

    def render_card(total):
        card = CARD.format(
            ja_conv=human(files["chatterbot_ja.jsonl.gz"]["conversations"]), table=table,
            tot_conv=human(totals["dialogue_conversations"]), tot_turns=human(totals["dialogue_turns"]),
            tot_en=human(totals["characters"]["en"]), tot_ja=human(totals["characters"]["ja"]),
            dlg_en=human(dlg_en), dlg_ja=human(dlg_ja), tan_en=human(tk["characters"]["en"]),
            tan_ja=human(tk["characters"]["ja"]), tot_bytes=human(totals["bytes_gz"]), example=example,
            cc_version=CHITCHAT["version"], cc_path=CHITCHAT["data_path"], cc_archive=CHITCHAT["archive"],
            cc_sha=CHITCHAT["sha256"], cc_home=CHITCHAT["homepage"], cc_total=human(cc_total),
            cc_one=human(cc_drop["one_speaker"]), cc_short=human(cc_drop["too_short"]),
            cc_dup=human(cc_drop["duplicate"]), cc_kept=human(cc["conversations"]),
            cc_nprompts=cc["distinct_prompts"], cc_with_prompt=human(cc["with_prompt"]),
            cc_ascii="All ASCII." if cc["non_ascii_characters"] == 0 else
                     "%s non-ASCII characters." % human(cc["non_ascii_characters"]),
            cb_dup_note=cb_dup_note, tk_avg_ja="%.1f" % (tk["characters"]["ja"] / max(1, tk["pairs"])),
            cb_version=CHATTERBOT["version"], cb_dir=CHATTERBOT["data_dir"],
            cb_nfiles_en=cb_nfiles["english"], cb_nfiles_ja=cb_nfiles["japanese"],
            cb_archive=CHATTERBOT["archive"], cb_sha=CHATTERBOT["sha256"], cb_home=CHATTERBOT["homepage"],
            cb_short_en=cb_drop["english"]["too_short"], cb_short_ja=cb_drop["japanese"]["too_short"],
            cb_dup_en=human(cb_drop["english"]["duplicate"]), cb_dup_ja=human(cb_drop["japanese"]["duplicate"]),
            cb_repairs=repairs_txt,
            tk_version=TANAKA["version"], tk_crate_sha=TANAKA["crate_sha256"], tk_path=TANAKA["data_path"],
            tk_sha=TANAKA["data_sha256"], tk_lic_url=TANAKA["license_url"],
            tk_code_lic=TANAKA["crate_code_license"], tk_dup=human(tk_stats["duplicate"]),
            tk_a=human(tk_stats["a_lines"]), tk_size_note=tk_size_note,
            du_total="%.1f MB" % (total / 1e6))
        write_text(os.path.join(out_dir, "README.md"), card)

    for _ in range(2):  # the card's own size is part of the total it states
        render_card(data_size())
    log("wrote %s (%s bytes of corpus)" % (starter, human(fixed_size)))
    log(json.dumps(totals, ensure_ascii=False))


if __name__ == "__main__":
    main()
