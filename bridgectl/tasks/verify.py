"""Answer verification for math tasks: math-verify (Hugging Face's parser and sympy-based checker), not hand-written
parsing, with a time limit per check that holds whatever thread calls it.

math-verify enforces its time limits with SIGALRM, which only works in a process's main thread, and a sympy
simplification can run for minutes on an adversarial completion. So every check runs in a helper process, in its
main thread, where math-verify's own per-check limits work; the caller (any thread) sends a batch and waits at most
`timeout_s` per item plus a margin, and a helper that does not answer in time is killed and restarted, its
unanswered items scored 0. The same verifier scores RL rewards and evaluation.

Gold answers: GSM8K's `#### 42` line (`gsm8k_gold`), MATH's last `\\boxed{...}` (`last_boxed`), or a plain answer
field. A completion's answer is what math-verify extracts: the last `\\boxed{}` or LaTeX/plain expression.
"""

from __future__ import annotations

import multiprocessing
import re
import threading

GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.MULTILINE)


def gsm8k_gold(solution: str) -> str | None:
    """The final answer after GSM8K's `####` marker, without thousands separators; None without a marker."""
    match = GSM8K_ANSWER.search(solution)
    return match.group(1).replace(",", "").strip() if match else None


def gsm8k_trace(solution: str) -> str:
    """The reasoning before `####`, with GSM8K's calculator annotations `<<48/2=24>>` removed."""
    return re.sub(r"<<[^>]*>>", "", GSM8K_ANSWER.sub("", solution)).strip()


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None when there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_brace = text.find("{", start)
    if open_brace < 0:
        return None
    depth = 0
    for index in range(open_brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[open_brace + 1 : index]
    return None


def _check(gold: str, completion: str, timeout_s: int) -> float:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    targets = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse(f"${gold}$", extraction_config=targets, parsing_timeout=timeout_s)
    if not gold_parsed:
        gold_parsed = parse(gold, extraction_config=targets, parsing_timeout=timeout_s)
    answer = parse(completion, extraction_config=targets, parsing_timeout=timeout_s)
    if not gold_parsed or not answer:
        return 0.0
    return float(verify(gold_parsed, answer, timeout_seconds=timeout_s))


def _serve(connection, timeout_s: int) -> None:
    """The helper process: checks (gold, completion) pairs in its main thread, one reply per item."""
    while True:
        try:
            batch = connection.recv()
        except EOFError:
            return
        for gold, completion in batch:
            try:
                connection.send(_check(gold, completion, timeout_s))
            except Exception:  # an unparsable answer, or math-verify's own time limit: wrong, not fatal
                connection.send(0.0)


class MathVerifier:
    """verifier.check(gold, completion) -> 1.0 or 0.0; check_batch for many. Thread-safe; one helper process."""

    def __init__(self, timeout_s: int = 5) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._process = None
        self._connection = None
        self.timeouts = 0  # helpers killed for not answering in time (their items scored 0)

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # no forked torch threads in the helper
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, self.timeout_s), daemon=True)
        self._process.start()
        child.close()

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join()
        self._process = self._connection = None

    def check_batch(self, pairs: list[tuple[str, str]]) -> list[float]:
        with self._lock:
            if self._process is None or not self._process.is_alive():
                self._start()
            self._connection.send(list(pairs))
            results = []
            for _ in pairs:
                # math-verify limits parsing (x2) and verification; the margin covers the helper's start-up
                if not self._connection.poll(3 * self.timeout_s + 30):
                    self.timeouts += 1
                    self._stop()
                    return results + [0.0] * (len(pairs) - len(results))
                try:
                    results.append(self._connection.recv())
                except (EOFError, OSError) as error:  # the helper died: a real failure, not a wrong answer
                    self._stop()
                    raise RuntimeError(f"the math-verify helper process died: {error}") from error
            return results

    def check(self, gold: str, completion: str) -> float:
        return self.check_batch([(gold, completion)])[0]

    def close(self) -> None:
        with self._lock:
            self._stop()

    def __del__(self) -> None:
        try:
            self._stop()
        except Exception:
            pass
