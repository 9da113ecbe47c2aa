"""Input limits and checks shared by the loaders (docs/reliability.md): every one fails with a
one-line UserError naming the field or file, before any expensive work.

    MAX_RECIPE_BYTES       recipe YAML files
    MAX_JSONL_LINE         one line of a benchmark JSONL
    MAX_IMAGE_PIXELS       width x height of an image, read from its header before decoding
    MAX_NEW_TOKENS         upper bound of --max-new-tokens / generate(max_new_tokens=...)
    MAX_PROMPT_CHARS       a question / --prompt
    MAX_PATTERN_CHARS      one regex of quant.weights.targets / ignore
    REGEX_BUDGET_S         wall time one pattern may take to match all module names (checked in a child
                           process that is killed past it: Python's `re` backtracks, a pattern like
                           ^(([a-z_.0-9]+)+)+X$ takes exponential time on a module name)
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

from quota_export import UserError

MAX_RECIPE_BYTES = 1 << 20  # 1 MiB: the shipped recipes are ~3 KB
MAX_JSONL_LINE = 1 << 16  # 64 KiB: a shipped sample is ~200 bytes
MAX_IMAGE_PIXELS = 8192 * 8192  # 64 MP; decoded RGB at most 192 MiB
MAX_NEW_TOKENS = 4096
MAX_PROMPT_CHARS = 1 << 14
MAX_PATTERN_CHARS = 1000
REGEX_BUDGET_S = 5.0


def check_text(text, what: str) -> str:
    """A prompt / question: a non-empty str of valid Unicode (no lone surrogates, which is what
    bytes that are not UTF-8 become on the command line), at most MAX_PROMPT_CHARS."""
    if not isinstance(text, str):
        raise UserError(f"{what}: expected text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what}: not valid UTF-8 text (undecodable byte at character {e.start})") from None
    if not text.strip():
        raise UserError(f"{what}: must not be empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise UserError(f"{what}: {len(text)} characters, more than the limit of {MAX_PROMPT_CHARS}")
    return text


def check_max_new_tokens(n, what: str = "max_new_tokens") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS:
        raise UserError(f"{what}: must be an integer from 1 to {MAX_NEW_TOKENS}, got {n!r}")
    return n


_CHILD = r"""
import json, re, sys
names = json.loads(sys.stdin.readline())
print("ready", flush=True)
for line in sys.stdin:
    p = re.compile(json.loads(line))
    print(json.dumps([i for i, n in enumerate(names) if p.search(n)]), flush=True)
"""


def match_within_budget(patterns: list[tuple[str, str]], names: list[str],
                        budget_s: float | None = None) -> list[list[int]]:
    """[(field, pattern)] -> per pattern the indices of the names `re.search` matches. Each pattern
    runs in a child process with Python's own `re` (the engine every later match uses) and is
    stopped past `budget_s`: a UserError naming the field then says it backtracks catastrophically."""
    if not patterns:
        return []
    budget_s = REGEX_BUDGET_S if budget_s is None else budget_s
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    buf = ""

    def line(deadline: float) -> str | None:
        nonlocal buf
        fd = proc.stdout.fileno()
        while "\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16).decode()
            if not chunk:
                return None
            buf += chunk
        out, buf = buf.split("\n", 1)
        return out

    try:
        proc.stdin.write(json.dumps(names) + "\n")
        proc.stdin.flush()
        if line(time.monotonic() + 60) != "ready":
            raise UserError("cannot check the recipe's module patterns (the checking process did not start)")
        res = []
        for field, pat in patterns:
            proc.stdin.write(json.dumps(pat) + "\n")
            proc.stdin.flush()
            got = line(time.monotonic() + budget_s)
            if got is None:
                raise UserError(f"{field}: pattern {pat!r} takes more than {budget_s:g} s to match the model's "
                                f"{len(names)} module names (nested repetition backtracks catastrophically); "
                                "simplify it")
            res.append(json.loads(got))
        return res
    finally:
        proc.kill()
        proc.wait()
