"""Cross-check of `kaiwa serve` with the official `openai` Python SDK plus raw HTTP.

Usage:

    python3 tests/python/openai_check.py BASE_URL --key KEY

BASE_URL is like http://127.0.0.1:PORT and the server has exactly KEY configured. Checks models,
plain and streamed completions (also at the raw SSE level), history with a system message, auth
errors, malformed bodies (400), a 20 MB body (413), store:false and named sessions, and drops a
stream mid-way. Exits 1 with a message on stderr at the first failure; otherwise prints one JSON
object on stdout with what the Rust test checks in the store (sessions and completion ids)."""

import argparse
import http.client
import json
import select
import socket
import struct
import sys
import time
import urllib.parse

import openai

TIMEOUT = 60.0
MODEL = "kaiwa"
JA = "今日の天気はどうですか？"


class CheckFailed(Exception):
    pass


def need(cond, msg):
    if not cond:
        raise CheckFailed(msg)


class Raw:
    """Raw HTTP with http.client, so that status, headers and body bytes are exactly as sent."""

    def __init__(self, base, key):
        u = urllib.parse.urlsplit(base)
        need(u.scheme == "http" and u.hostname, "BASE_URL must be http://HOST:PORT, got %r" % base)
        self.host, self.port, self.key = u.hostname, u.port or 80, key

    def conn(self):
        return http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)

    def headers(self, auth=True, extra=None):
        h = {"Content-Type": "application/json"}
        if auth:
            h["Authorization"] = "Bearer " + self.key
        h.update(extra or {})
        return h

    def request(self, method, path, body=None, auth=True, extra=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body, ensure_ascii=False)
        if isinstance(body, str):
            body = body.encode("utf-8")
        c = self.conn()
        try:
            c.request(method, path, body=body, headers=self.headers(auth, extra))
            r = c.getresponse()
            return r.status, r.getheader("Content-Type") or "", r.read()
        finally:
            c.close()


def check_error_body(what, status, ctype, body, want_status):
    desc = "%s: got HTTP %s, body %r" % (what, status, body[:500].decode("utf-8", "replace"))
    need(status == want_status, "%s (expected %d)" % (desc, want_status))
    need(ctype.startswith("application/json"), "%s: Content-Type %r, not JSON" % (desc, ctype))
    try:
        err = json.loads(body.decode("utf-8"))["error"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckFailed("%s: not {\"error\": {...}} JSON (%s)" % (desc, e))
    need(isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"]
         and isinstance(err.get("type"), str) and "code" in err and "param" in err,
         "%s: error object lacks message/type/param/code" % desc)
    return err


def check_models(t):
    ids = [m.id for m in t.client.models.list().data]
    need(MODEL in ids, "models.list() ids %r lack %r" % (ids, MODEL))


def check_completion(c, what):
    need(c.id.startswith("chatcmpl-"), "%s: id %r does not start with chatcmpl-" % (what, c.id))
    need(len(c.choices) == 1, "%s: %d choices, expected 1" % (what, len(c.choices)))
    ch = c.choices[0]
    need(ch.message.role == "assistant", "%s: role %r" % (what, ch.message.role))
    need(ch.message.content, "%s: empty content" % what)
    need(ch.finish_reason in ("stop", "length"), "%s: finish_reason %r" % (what, ch.finish_reason))
    u = c.usage
    need(u is not None and u.prompt_tokens > 0 and u.completion_tokens > 0
         and u.total_tokens == u.prompt_tokens + u.completion_tokens, "%s: bad usage %r" % (what, u))


def check_plain(t):
    c = t.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": JA}], max_tokens=32)
    check_completion(c, "plain completion")
    t.out["plain_id"] = c.id


def check_stream_sdk(t):
    stream = t.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": JA}], max_tokens=32,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    need(len(chunks) >= 4, "stream: only %d chunks" % len(chunks))
    ids = {(k.id, k.created) for k in chunks}
    need(len(ids) == 1, "stream: chunks differ in id/created: %r" % ids)
    need(chunks[0].id.startswith("chatcmpl-"), "stream: id %r" % chunks[0].id)
    first, last = chunks[0], chunks[-1]
    need(len(first.choices) == 1 and first.choices[0].delta.role == "assistant"
         and first.choices[0].delta.content == "", "stream: first chunk %r" % first)
    need(last.choices == [] and last.usage is not None and last.usage.completion_tokens > 0,
         "stream: last chunk is not the usage chunk: %r" % last)
    body = chunks[:-1]
    need(all(len(k.choices) == 1 for k in body), "stream: chunk without exactly one choice")
    finished = [i for i, k in enumerate(body) if k.choices[0].finish_reason is not None]
    need(finished == [len(body) - 1], "stream: finish_reason on chunks %r of %d" % (finished, len(body)))
    fin = body[-1].choices[0]
    need(fin.finish_reason in ("stop", "length"), "stream: finish_reason %r" % fin.finish_reason)
    need(not fin.delta.content, "stream: finish chunk carries content %r" % fin.delta.content)
    need(all(k.usage is None for k in body), "stream: usage on a non-final chunk")
    text = "".join(k.choices[0].delta.content or "" for k in body)
    need(text, "stream: joined content is empty")
    t.out["stream_id"] = first.id


def check_stream_raw(t):
    c = t.raw.conn()
    try:
        c.request("POST", "/v1/chat/completions", headers=t.raw.headers(), body=json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": JA}], "max_tokens": 32,
             "stream": True, "stream_options": {"include_usage": True}}).encode())
        r = c.getresponse()
        ctype, body = r.getheader("Content-Type") or "", r.read()
    finally:
        c.close()
    need(r.status == 200, "raw stream: HTTP %d %r" % (r.status, body[:500]))
    need(ctype.startswith("text/event-stream"), "raw stream: Content-Type %r" % ctype)
    events = [e for e in body.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
    need(events and events[-1].strip() == b"data: [DONE]",
         "raw stream: does not end with data: [DONE] (tail %r)" % body[-200:])
    ids = set()
    for ev in events[:-1]:
        need(ev.startswith(b"data:"), "raw stream: event is not data: %r" % ev[:200])
        try:
            obj = json.loads(ev[5:].decode("utf-8"))  # strict: a split character fails here
        except ValueError as e:
            raise CheckFailed("raw stream: payload not UTF-8 JSON (%s): %r" % (e, ev[:200]))
        need(obj.get("object") == "chat.completion.chunk", "raw stream: object %r" % obj.get("object"))
        ids.add(obj.get("id"))
    need(len(ids) == 1, "raw stream: ids %r" % ids)


def check_stream_no_usage(t):
    chunks = list(t.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": JA}], max_tokens=16, stream=True))
    need(chunks, "stream without usage: no chunks")
    for k in chunks:
        need(k.usage is None and len(k.choices) == 1,
             "stream without include_usage sent a usage/empty-choices chunk: %r" % k)


def check_history(t):
    c = t.client.chat.completions.create(model=MODEL, max_tokens=32, messages=[
        {"role": "system", "content": "You are a friendly assistant. Answer briefly."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi! How can I help you today?"},
        {"role": "user", "content": "What did you have for breakfast?"}])
    check_completion(c, "conversation with history")


def check_auth(t):
    bad = sdk_client(t.base, "wrong")
    try:
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        raise CheckFailed("wrong key: request succeeded")
    except openai.AuthenticationError as e:
        need(e.status_code == 401, "wrong key: status %s" % e.status_code)
    except openai.APIStatusError as e:
        raise CheckFailed("wrong key: HTTP %s, expected 401: %s" % (e.status_code, e.response.text))
    for path, body in (("/v1/chat/completions", {"model": MODEL, "messages": [
            {"role": "user", "content": "hi"}]}), ("/v1/models", None)):
        st, ct, b = t.raw.request("POST" if body else "GET", path, body, auth=False)
        check_error_body("no Authorization on " + path, st, ct, b, 401)


def check_unknown_model(t):
    try:
        t.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        raise CheckFailed("unknown model: request succeeded")
    except openai.NotFoundError as e:
        need(e.code == "model_not_found", "unknown model: code %r" % e.code)
    except openai.APIStatusError as e:
        raise CheckFailed("unknown model: HTTP %s, expected 404: %s" % (e.status_code, e.response.text))


MSG = [{"role": "user", "content": "hi"}]
MALFORMED = [
    ("not JSON", '{"messages": ['),
    ("messages a string", {"model": MODEL, "messages": "hi"}),
    ("no model", {"messages": MSG}),
    ("stream_options without stream", {"model": MODEL, "messages": MSG,
                                       "stream_options": {"include_usage": True}}),
    ("max_tokens a string", {"model": MODEL, "messages": MSG, "max_tokens": "ten"}),
    ("temperature a string", {"model": MODEL, "messages": MSG, "temperature": "hot"}),
    ("unknown role", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}),
    ("empty messages", {"model": MODEL, "messages": []}),
    ("last message not from user", {"model": MODEL, "messages": MSG + [
        {"role": "assistant", "content": "hello"}]}),
    ("n = 2", {"model": MODEL, "messages": MSG, "n": 2}),
]


def check_malformed(t):
    for name, body in MALFORMED:
        st, ct, b = t.raw.request("POST", "/v1/chat/completions", body)
        check_error_body("malformed body (%s)" % name, st, ct, b, 400)


def check_huge(t):
    """20 MB POST with Content-Length; stop sending as soon as the server answers, then read it."""
    size = 20 * 1024 * 1024
    head, tail = b'{"model":"kaiwa","messages":[{"role":"user","content":"', b'"}]}'
    pad = size - len(head) - len(tail)
    req = ("POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
           "Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
           % (t.raw.host, t.raw.port, t.raw.key, size)).encode()
    todo = [req, head] + [b"a" * 65536] * (pad // 65536) + [b"a" * (pad % 65536), tail]
    send_err, deadline = None, time.monotonic() + TIMEOUT
    with socket.create_connection((t.raw.host, t.raw.port), timeout=TIMEOUT) as s:
        try:
            while todo and time.monotonic() < deadline:
                rd, wr, _ = select.select([s], [s], [], 1.0)
                if rd:
                    break  # an early answer (413): read it below
                if wr:
                    todo[0] = todo[0][s.send(todo[0]):]
                    if not todo[0]:
                        todo.pop(0)
        except (BrokenPipeError, ConnectionResetError) as e:
            send_err = e  # the server closed early: its answer may still be readable
        r = http.client.HTTPResponse(s)
        try:
            r.begin()
            body = r.read()
        except (OSError, http.client.HTTPException) as e:
            raise CheckFailed("20 MB body: no response could be read (%s: %s; while sending: %s)"
                              % (type(e).__name__, e, send_err or "no error"))
    check_error_body("20 MB body", r.status, r.getheader("Content-Type") or "", body, 413)


def check_cut(t):
    """Read a long stream until it has shown some text (not only white space), then drop the
    connection with a RST."""
    c = t.raw.conn()
    c.request("POST", "/v1/chat/completions", headers=t.raw.headers(extra={
        "X-Kaiwa-Session": "cut-test"}), body=json.dumps({"model": MODEL, "messages": [
            {"role": "user", "content": JA}], "max_tokens": 2000, "stream": True}).encode())
    sock = c.sock
    r = c.getresponse()
    try:
        need(r.status == 200, "cut stream: HTTP %d %r" % (r.status, r.read(500)))
        cut_id, seen = None, ""
        while cut_id is None:
            line = r.readline()
            need(line, "cut stream: ended before any content chunk")
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                need(line != b"data: [DONE]", "cut stream: [DONE] before any content")
                continue
            obj = json.loads(line[5:].decode("utf-8"))
            if obj.get("choices") and obj["choices"][0].get("delta", {}).get("content"):
                seen += obj["choices"][0]["delta"]["content"]
                if seen.strip():
                    cut_id = obj["id"]
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        r.close()
        c.close()
        sock.close()
    t.out["cut_session"], t.out["cut_id"] = "cut-test", cut_id


def check_private(t):
    c = t.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "This is private."}], max_tokens=16,
        store=False, extra_headers={"X-Kaiwa-Session": "private-test"})
    check_completion(c, "store:false completion")
    t.out["private_session"], t.out["private_id"] = "private-test", c.id


def check_session(t):
    c = t.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": JA}], max_tokens=32,
        extra_headers={"X-Kaiwa-Session": "sdk-session"})
    check_completion(c, "completion in session sdk-session")
    t.out["session"], t.out["stored_id"] = "sdk-session", c.id


def sdk_client(base, key):
    # trust_env=False: a proxy from the environment must not intercept a local server
    return openai.OpenAI(base_url=base + "/v1", api_key=key, timeout=TIMEOUT, max_retries=0,
                         http_client=openai.DefaultHttpxClient(trust_env=False))


def wait_healthy(raw):
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            st, _, b = raw.request("GET", "/health", auth=False)
            if st == 200:
                return
        except OSError as e:
            st, b = None, str(e)
        need(time.monotonic() < deadline, "GET /health not 200 after %ds: %s %r" % (TIMEOUT, st, b))
        time.sleep(0.5)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base_url")
    ap.add_argument("--key", required=True)
    a = ap.parse_args()
    base = a.base_url.rstrip("/")
    out = {}
    try:
        raw = Raw(base, a.key)
        client = sdk_client(base, a.key)
        wait_healthy(raw)
        t = argparse.Namespace(base=base, raw=raw, client=client, out=out)
        checks = [check_models, check_plain, check_stream_sdk, check_stream_raw,
                  check_stream_no_usage, check_history, check_auth, check_unknown_model,
                  check_malformed,
                  check_huge, check_private, check_session, check_cut]
        for fn in checks:
            try:
                fn(t)
            except CheckFailed:
                raise
            except (openai.OpenAIError, OSError, ValueError, LookupError, TypeError,
                    AttributeError) as e:
                raise CheckFailed("%s: %s: %s" % (fn.__name__, type(e).__name__, e))
            print("ok:", fn.__name__, file=sys.stderr)
    except CheckFailed as e:
        print("openai_check FAILED: %s" % e, file=sys.stderr)
        sys.exit(1)
    out["ok"] = True
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
