#!/usr/bin/env python3
"""Chooses the reply engine's ranker weights on the development half of the everyday suites.

Input: a `kaiwa eval` report.json made with every candidate scored by the model
(`SCORED_CANDIDATES=64 kaiwa eval --candidates 0 --report DIR`), so the choice among candidates can be
replayed for any weights without running the model again: the engine keeps the best `scored`
candidates by the cheap scores (similarity, topic, feedback, length), ranks those by the full
weighted sum, and falls back when the best is below `min_score`.

The objective is the suites' own topic check (a keyword of the case in the reply): the worse
language first, then the mean, on `split: dev` cases only. The figures of the `test` half are
printed for the chosen weights. No third-party packages: any Python 3 runs it.

    python3 research/ranker/tune.py /tmp/tune/report.json [--scored 12]
"""
import argparse
import itertools
import json
import unicodedata


def normalize(text):
    return unicodedata.normalize("NFKC", text).lower()


def contains_keyword(text, keyword):
    """The suite's check: a keyword starting with an ASCII letter or digit must start a word."""
    if not keyword:
        return False
    if not (keyword[0].isascii() and keyword[0].isalnum()):
        return keyword in text
    start = 0
    while True:
        at = text.find(keyword, start)
        if at < 0:
            return False
        before = text[at - 1] if at > 0 else ""
        if not (before.isascii() and before.isalnum()):
            return True
        start = at + 1


def on_topic(reply, keywords):
    haystack = normalize(reply)
    return any(contains_keyword(haystack, normalize(k)) for k in keywords)


def keywords_of(path):
    """Case id -> keywords, from a suite file (a minimal reader for `keywords_any: [...]`)."""
    out, current = {}, None
    for line in open(path, encoding="utf-8"):
        s = line.strip()
        if s.startswith("- id:"):
            current = s.split(":", 1)[1].strip()
        elif s.startswith("keywords_any:") and current:
            items = s.split(":", 1)[1].strip().strip("[]")
            out[current] = [i.strip().strip("'\"") for i in items.split(",") if i.strip()]
    return out


def cheap(c, w):
    s = c["scores"]
    return (w["similarity"] * s["similarity"] + w["topic"] * s["topic"]
            + w["coverage"] * s.get("coverage", 0.0)
            + w["feedback"] * s["feedback"] + w["length"] * s["length"])


def total(c, w):
    s = c["scores"]
    mmi = s["likelihood"] - w["lambda"] * s["unconditional"]
    return cheap(c, w) + w["mmi"] * mmi + w["likelihood"] * s["likelihood"]


def choose(case, w, scored):
    """The engine's choice for `case` under weights `w` (None: the fallback)."""
    live = [c for c in case["candidates"] if c["rejected"] is None]
    if not live:
        return None
    live.sort(key=lambda c: cheap(c, w), reverse=True)
    best = max(live[:scored], key=lambda c: total(c, w))
    return None if total(best, w) < w["min_score"] else best


def evaluate(cases, w, scored, split):
    per = {}
    for c in cases:
        if split != "all" and c["split"] != split:
            continue
        best = choose(c, w, scored)
        hit = best is not None and on_topic(best["text"], c["keywords"])
        n, k, fb = per.get(c["language"], (0, 0, 0))
        per[c["language"]] = (n + 1, k + hit, fb + (best is None))
    return per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("--scored", type=int, default=12)
    args = ap.parse_args()
    report = json.load(open(args.report))
    cases = []
    for f in report["suite"]["files"]:
        keywords = keywords_of(f["path"])
        for c in f["cases"]:
            if c.get("split") in ("dev", "test") and keywords.get(c["id"]):
                c["keywords"] = keywords[c["id"]]
                cases.append(c)
    unscored = sum(
        1 for c in cases for x in c["candidates"]
        if x["rejected"] is None and x["scores"]["likelihood"] == 0.0
    )
    if unscored:
        print(f"warning: {unscored} candidates were not scored by the model (raise SCORED_CANDIDATES)")
    grid = {
        "similarity": [0.0, 0.5, 1.0, 2.0],
        "topic": [0.0, 0.5, 1.0, 2.0],
        "coverage": [0.0, 0.5, 1.0, 2.0],
        "mmi": [0.0, 0.1, 0.2, 0.5, 1.0],
        "lambda": [0.0, 0.5, 1.0],
        "likelihood": [0.0, 0.2],
        "feedback": [0.3],
        "length": [0.3],
        "min_score": [-1e9],
    }
    results = []
    for values in itertools.product(*grid.values()):
        w = dict(zip(grid, values))
        if w["similarity"] == 0 and w["topic"] == 0:
            continue
        per = evaluate(cases, w, args.scored, "dev")
        shares = [k / n for n, k, _ in per.values()]
        results.append(((min(shares), sum(shares) / len(shares)), w, per))
    results.sort(key=lambda r: r[0], reverse=True)
    for score, w, per in results[:10]:
        print(f"{score[0]:.3f} {score[1]:.3f}", w, {l: f"{k}/{n}" for l, (n, k, _) in per.items()})
    best = results[0][1]
    # The fallback threshold: the highest that costs no dev case its on-topic reply.
    totals = sorted(
        total(b, best) for c in cases if c["split"] == "dev"
        for b in [choose(c, best, args.scored)] if b is not None
    )
    print("chosen:", best)
    print("lowest winning total on dev:", totals[0] if totals else None)
    for split in ("dev", "test"):
        per = evaluate(cases, best, args.scored, split)
        print(split, {l: f"{k}/{n} on topic, {fb} fallbacks" for l, (n, k, fb) in per.items()})


if __name__ == "__main__":
    main()
