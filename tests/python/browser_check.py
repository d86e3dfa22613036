"""Browser check for the `kaiwa serve` web page (src/web/page.html).

Drives Debian's headless Chromium through chromedriver, speaking the W3C WebDriver protocol over
HTTP with the standard library only (no selenium). Usage:

    python3 tests/python/browser_check.py BASE_URL --screenshot OUT.png \
        [--chromium PATH] [--chromedriver PATH]

Sends a Japanese message with the keyboard, waits for the streamed reply, checks that an Enter
pressed while an IME is composing does not send, that the conversation survives a reload, that
👍 feedback sticks, takes a phone-sized screenshot, then starts a new conversation and checks the
page is empty (also after a reload). Prints one JSON line and exits 0, or explains on stderr and
exits 1."""

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

MESSAGE = "今日の天気はどうですか？"
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"
ENTER = "\ue007"
REPLY_TIMEOUT = 60.0
WAIT_TIMEOUT = 20.0


class CheckFailed(Exception):
    pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=60.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json; charset=utf-8")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            raw = res.read()
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            v = json.loads(raw).get("value", {})
            msg = f"{v.get('error')}: {v.get('message', '')[:500]}"
        except (ValueError, AttributeError):
            msg = raw[:500].decode("utf-8", "replace")
        raise CheckFailed(f"WebDriver {method} {url} -> HTTP {e.code}: {msg}") from None
    return json.loads(raw).get("value") if raw else None


class Driver:
    def __init__(self, chromedriver, chromium):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [chromedriver, f"--port={self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.session = None
        deadline = time.time() + 30
        while True:
            if self.proc.poll() is not None:
                raise CheckFailed(f"chromedriver exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if http("GET", self.base + "/status", timeout=2).get("ready"):
                    break
            except (OSError, CheckFailed):
                pass
            if time.time() > deadline:
                raise CheckFailed("chromedriver did not become ready within 30 s")
            time.sleep(0.2)
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=420,800", "--lang=ja",
            ],
                # Desktop Chrome will not make a window narrower than ~500 px; emulate a phone
                # screen so the page really lays out (and is captured) at phone width.
                "mobileEmulation": {"deviceMetrics": {"width": 390, "height": 800, "pixelRatio": 2}},
            },
            "timeouts": {"script": 30000, "pageLoad": 60000, "implicit": 0},
        }}}
        self.session = http("POST", self.base + "/session", caps, timeout=90)["sessionId"]

    def log_tail(self):
        try:
            self.log.seek(0)
            return self.log.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def cmd(self, method, path, body=None, timeout=60.0):
        return http(method, f"{self.base}/session/{self.session}{path}", body, timeout)

    def js(self, script, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css):
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT_KEY]

    def click(self, el):
        self.cmd("POST", f"/element/{el}/click", {})

    def close(self):
        try:
            if self.session:
                http("DELETE", f"{self.base}/session/{self.session}", timeout=30)
        except (OSError, CheckFailed) as e:
            print(f"warning: could not end the WebDriver session: {e}", file=sys.stderr)
        finally:
            self.session = None
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            # chromedriver ran in its own process group: take down anything it left behind.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.log.close()


def wait_for(what, fn, timeout=WAIT_TIMEOUT, interval=0.2):
    deadline = time.time() + timeout
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.time() > deadline:
            raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# Reads the conversation as the page shows it.
STATE_JS = """
const text = (el) => { const t = el.querySelector('.text'); return (t || el).textContent; };
const log = document.getElementById('messages');
return {
  loaded: !!log && log.getAttribute('aria-busy') !== 'true',
  msgs: Array.from(document.querySelectorAll('.msg'), (el) => ({
    role: el.classList.contains('user') ? 'user' : el.classList.contains('assistant') ? 'assistant' : '?',
    id: el.dataset.id || null, done: el.dataset.done === 'true', text: text(el),
  })),
  input: (document.getElementById('input') || {}).value,
  status: (document.getElementById('status') || {}).textContent || '',
  sendDisabled: !!(document.getElementById('send') || {}).disabled,
};
"""


def state(d):
    return d.js(STATE_JS)


def loaded_state(d):
    """Waits for the page's initial history render (#messages loses aria-busy) and returns state."""
    try:
        return wait_for("the page to load its history (#messages losing aria-busy)",
                        lambda: (lambda s: s if s["loaded"] else None)(state(d)))
    except CheckFailed as e:
        page = d.js("return {url: location.href, title: document.title,"
                    " chat: !!document.getElementById('messages'),"
                    " status: (document.getElementById('status') || {}).textContent || ''};")
        raise CheckFailed(f"{e}; page {page} (is the server up and serving page.html?)") from None


def check_conversation(s, reply_id, reply_text, when):
    users = [m for m in s["msgs"] if m["role"] == "user"]
    bots = [m for m in s["msgs"] if m["role"] == "assistant"]
    if not any(m["text"] == MESSAGE for m in users):
        raise CheckFailed(f"{when}: the user message is not shown; messages: {s['msgs']}")
    match = [m for m in bots if m["id"] == reply_id]
    if not match:
        raise CheckFailed(f"{when}: no assistant message with data-id {reply_id!r}; messages: {s['msgs']}")
    if not match[0]["done"] or match[0]["text"].strip() != reply_text.strip():
        raise CheckFailed(f"{when}: reply {reply_id} differs: {match[0]} vs text {reply_text!r}")


def run(args):
    d = Driver(args.chromedriver, args.chromium)
    try:
        # a. send a Japanese message with the keyboard and wait for the streamed reply.
        d.cmd("POST", "/url", {"url": args.base_url})
        s = loaded_state(d)
        if s["msgs"]:
            raise CheckFailed(f"a fresh browser profile should start with an empty conversation: {s['msgs']}")
        inp = d.find("#input")
        d.cmd("POST", f"/element/{inp}/value", {"text": MESSAGE})
        typed = state(d)["input"]
        if typed != MESSAGE:
            raise CheckFailed(f"typing into #input gave {typed!r}, expected {MESSAGE!r}")
        d.cmd("POST", f"/element/{inp}/value", {"text": ENTER})

        def reply():
            s = state(d)
            if s["status"].strip() and not s["sendDisabled"]:
                raise CheckFailed(f"the page shows an error: {s['status']!r}")
            users = [i for i, m in enumerate(s["msgs"]) if m["role"] == "user" and m["text"] == MESSAGE]
            if not users:
                return None
            after = [m for m in s["msgs"][users[-1] + 1:] if m["role"] == "assistant"]
            if after and after[0]["done"] and after[0]["text"].strip() and not s["sendDisabled"]:
                return after[0]
            return None

        bot = wait_for("the streamed reply (.msg.assistant[data-done=true])", reply, timeout=REPLY_TIMEOUT)
        reply_id, reply_text = bot["id"], bot["text"]
        if not reply_id:
            raise CheckFailed("the finished reply has no data-id (the stream chunks' id)")
        if state(d)["input"] != "":
            raise CheckFailed("the input was not cleared after sending")

        # b. an Enter keydown while an IME is composing must not send.
        n_users = sum(m["role"] == "user" for m in state(d)["msgs"])
        probe = d.js("""
            const inp = document.getElementById('input');
            inp.value = 'きょうは';
            inp.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', code: 'Enter',
              isComposing: true, bubbles: true, cancelable: true}));
            // Safari-style: composition already ended but keyCode is still 229.
            const ev = new KeyboardEvent('keydown', {key: 'Enter', code: 'Enter', keyCode: 229,
              bubbles: true, cancelable: true});
            inp.dispatchEvent(ev);
            return ev.keyCode;""")
        time.sleep(1.0)
        s = state(d)
        n_after = sum(m["role"] == "user" for m in s["msgs"])
        if n_after != n_users or s["input"] != "きょうは":
            raise CheckFailed(
                f"Enter during IME composition sent a message (user messages {n_users} -> {n_after}, "
                f"input now {s['input']!r}; synthetic keyCode was {probe})")
        d.js("const inp = document.getElementById('input'); inp.value = '';"
             "inp.dispatchEvent(new Event('input', {bubbles: true}));")

        # c. the conversation survives a reload.
        d.cmd("POST", "/refresh", {})
        check_conversation(loaded_state(d), reply_id, reply_text, "after reload")

        # d. 👍 the reply.
        up = d.js("""
            const el = Array.from(document.querySelectorAll('.msg.assistant'))
              .find((e) => e.dataset.id === arguments[0]);
            return el ? el.querySelector('.up') : null;""", reply_id)
        if not up:
            raise CheckFailed("the reply has no .up (👍) button")
        up = up[ELEMENT_KEY]
        label = d.cmd("GET", f"/element/{up}/attribute/aria-label")
        if not label:
            raise CheckFailed("the 👍 button has no aria-label")
        d.click(up)
        wait_for("👍 aria-pressed=true",
                 lambda: d.cmd("GET", f"/element/{up}/attribute/aria-pressed") == "true")

        # e. screenshot while the conversation is on screen.
        png = base64.b64decode(d.cmd("GET", "/screenshot"))
        if not png.startswith(b"\x89PNG"):
            raise CheckFailed("the screenshot is not a PNG")
        with open(args.screenshot, "wb") as f:
            f.write(png)

        # the 👍 is stored server-side: it is still pressed after a reload.
        d.cmd("POST", "/refresh", {})
        loaded_state(d)
        pressed = d.js("""
            const el = Array.from(document.querySelectorAll('.msg.assistant'))
              .find((e) => e.dataset.id === arguments[0]);
            return el && el.querySelector('.up').getAttribute('aria-pressed');""", reply_id)
        if pressed != "true":
            raise CheckFailed(f"after a reload the 👍 is not pressed (aria-pressed={pressed!r})")

        session = d.js("return localStorage.getItem('kaiwa.session');")
        if not session:
            raise CheckFailed("the page keeps no session id in localStorage ('kaiwa.session')")

        # f. new conversation: empty now and after a reload.
        d.click(d.find("#new"))
        wait_for("the messages to be cleared after #new", lambda: not state(d)["msgs"])
        d.cmd("POST", "/refresh", {})
        s = loaded_state(d)
        if s["msgs"]:
            raise CheckFailed(f"after #new and a reload, messages remain: {s['msgs']}")
        if s["status"].strip():
            raise CheckFailed(f"the page shows an error after reload: {s['status']!r}")

        print(json.dumps({"reply_id": reply_id, "reply_text": reply_text, "session": session},
                         ensure_ascii=False))
    except CheckFailed:
        tail = d.log_tail()
        if tail:
            print("chromedriver log tail:\n" + tail, file=sys.stderr)
        raise
    finally:
        d.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base_url")
    ap.add_argument("--screenshot", required=True)
    ap.add_argument("--chromium")
    ap.add_argument("--chromedriver")
    args = ap.parse_args()
    args.base_url = args.base_url.rstrip("/") + "/"
    args.chromium = args.chromium or shutil.which("chromium") or shutil.which("chromium-browser")
    args.chromedriver = args.chromedriver or shutil.which("chromedriver")
    if not args.chromium or not args.chromedriver:
        print("browser_check: chromium and chromedriver are needed (apt-get install chromium "
              "chromium-driver), or pass --chromium/--chromedriver", file=sys.stderr)
        return 1
    try:
        run(args)
    except CheckFailed as e:
        print(f"browser_check: FAILED: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"browser_check: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
