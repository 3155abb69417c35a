"""Regular expressions from adapter_config.json, matched against module names as PEFT matches them, in bounded time.

PEFT reads several config fields as regular expressions (target_modules or exclude_modules given as a string,
rank_pattern/alpha_pattern keys, layers_pattern, modules_to_save entries) and runs them with Python's backtracking
`re`, which takes exponential time on patterns like `(.*.*)*X` and polynomial time of high degree on `.*.*.*.*X`.
A config is input, so each pattern is first given a bound on the backtracking steps `re` can take on a name of a
given length, from its parsed form: a pattern within budget runs on `re` itself (exact, every feature); one past it
runs on a linear-time automaton built from the same parse (automaton.py: the yes/no answer of a regex does not
depend on greedy or lazy choices, so it equals `re`'s), which covers everything but backreferences, lookarounds,
atomic groups and possessive repeats. A pattern past the budget that needs one of those is refused rather than run.

Plain names (no regex syntax but `.`, the most common key by far) never reach a regex engine: they are matched by
lookup, so twenty thousand rank_pattern keys cost what one does.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence

from ..errors import UnsupportedAdapter
from .automaton import Automaton, PatternTooComplex
from .automaton import sre as _sre
from .automaton import sre_parser as _sre_parser

log = logging.getLogger(__name__)

# Backtracking steps `re` may take on one name; past it a pattern runs on the automaton. At tens of nanoseconds a
# step this keeps the worst case near a millisecond per name.
STEP_BUDGET = 20_000
# Wall time one set of patterns may spend matching module names in all, every single match being bounded already:
# only thousands of costly patterns over thousands of modules get near it.
TIME_BUDGET_S = 30.0
# Regex syntax other than `.`: a key without any is a dotted name, matched without a regex engine.
_SYNTAX = re.compile(r"[\\^$*+?{}\[\]|()]")
_CAP = 1e30


class SafeRegex:
    """One regular expression, matched with `re.match`/`re.fullmatch`'s yes/no answer in bounded time."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.compiled = re.compile(pattern)  # re.error for an invalid pattern, as PEFT would raise
        self.parsed = _parse(pattern)
        # the longest name `re` can match within budget (all names when the pattern has no costly structure)
        self.safe_length = _safe_length(self.parsed) if self.parsed is not None else 1 << 62
        self._automaton: Automaton | None = None
        self._automaton_error: str | None = None

    def match(self, text: str) -> bool:
        """Whether `re.match(pattern, text)` matches."""
        if len(text) <= self.safe_length:
            return self.compiled.match(text) is not None
        return self._run(text, full=False)

    def fullmatch(self, text: str) -> bool:
        """Whether `re.fullmatch(pattern, text)` matches."""
        if len(text) <= self.safe_length:
            return self.compiled.fullmatch(text) is not None
        return self._run(text, full=True)

    def re_match(self, text: str) -> re.Match[str] | None:
        """`re.match(pattern, text)` with its groups, for patterns within budget on `text`."""
        if len(text) > self.safe_length:
            raise PatternTooComplex(f"{self.pattern!r} could backtrack for a very long time on a name that long")
        return self.compiled.match(text)

    def _run(self, text: str, full: bool) -> bool:
        if self._automaton is None and self._automaton_error is None:
            try:
                self._automaton = Automaton(self.parsed)
            except PatternTooComplex as exc:
                self._automaton_error = str(exc)
        if self._automaton is None:
            raise PatternTooComplex(
                f"{self.pattern!r} could backtrack for a very long time (nested or repeated wildcards) and "
                f"{self._automaton_error}"
            )
        return self._automaton.run(text, full)


class PatternKeys:
    """PEFT's `get_pattern_key` over the keys of a rank_pattern or alpha_pattern: the first key, in the file's
    order, that matches the module name or its tail after a dot, as `re.match(rf"(.*\\.)?({key})$", name)`.

    PEFT does not escape the keys, so `layers.0` also matches `layers_0`: a plain key's `.` stays a wildcard here.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = tuple(keys)
        # plain keys by length, then by the positions of their wildcards: the other characters -> key indices
        self._plain: dict[int, dict[tuple[int, ...], dict[str, list[int]]]] = {}
        self._regex: list[tuple[int, SafeRegex]] = []
        self._slow_plain: dict[int, SafeRegex] = {}
        self._spent = 0.0
        self._memo: dict[tuple[str, bool], tuple[int, ...]] = {}
        for index, key in enumerate(self.keys):
            if _SYNTAX.search(key):
                try:
                    self._regex.append((index, SafeRegex(rf"(.*\.)?({key})$")))
                except re.error as exc:
                    raise PatternError(key, exc) from exc
                continue
            fixed = tuple(i for i, ch in enumerate(key) if ch != ".")
            chars = "".join(key[i] for i in fixed)
            self._plain.setdefault(len(key), {}).setdefault(fixed, {}).setdefault(chars, []).append(index)

    def first(self, module: str) -> str | None:
        """The first key that matches `module`, or None."""
        found = self._matching(module, first=True)
        return self.keys[found[0]] if found else None

    def all(self, module: str) -> list[str]:
        """Every key that matches `module`, in the file's order."""
        return [self.keys[i] for i in self._matching(module, first=False)]

    def _matching(self, module: str, first: bool) -> list[int]:
        # the planner asks again for modules already matched: answered from memory, and only new work counts
        # against the time budget
        remembered = self._memo.get((module, first))
        if remembered is not None:
            return list(remembered)
        found = self._match(module, first)
        if len(self._memo) > 100_000:
            self._memo.clear()
        self._memo[module, first] = tuple(found)
        return found

    def _match(self, module: str, first: bool) -> list[int]:
        started = time.monotonic()
        found = self._plain_matches(module)
        best = min(found) if found else len(self.keys)
        for index, regex in self._regex:
            if first and index > best:
                break
            try:
                if regex.match(module):
                    found.append(index)
                    best = min(best, index)
            except PatternTooComplex as exc:
                raise PatternError(self.keys[index], exc) from exc
        self._spent += time.monotonic() - started
        if self._spent > TIME_BUDGET_S:
            reason = PatternTooComplex(
                f"matching {len(self.keys)} rank_pattern/alpha_pattern keys took over {TIME_BUDGET_S:g} s"
            )
            raise PatternError("", reason)
        found.sort()
        return found[:1] if first else found

    def _plain_matches(self, module: str) -> list[int]:
        if "\n" in module:  # `.` and `$` treat a newline specially: leave such a name to re (plain keys are cheap)
            return [i for i, key in enumerate(self.keys) if not _SYNTAX.search(key) and self._slow(i, key, module)]
        found: list[int] = []
        n = len(module)
        for length, by_mask in self._plain.items():
            # `(.*\.)?` before the key: it starts the name or follows a dot
            if length > n or (length < n and module[n - length - 1] != "."):
                continue
            tail = module[n - length :]
            for fixed, by_chars in by_mask.items():
                found.extend(by_chars.get("".join(tail[i] for i in fixed), ()))
        return found

    def _slow(self, index: int, key: str, module: str) -> bool:
        if index not in self._slow_plain:
            self._slow_plain[index] = SafeRegex(rf"(.*\.)?({key})$")
        return self._slow_plain[index].match(module)


class PatternError(UnsupportedAdapter):
    """A rank_pattern/alpha_pattern key that is not a valid regex, or cannot be matched safely: `key` and the
    reason. Config readers name the file and field; raised later, it still says which key."""

    def __init__(self, key: str, reason: Exception) -> None:
        super().__init__(f"rank_pattern/alpha_pattern key {key[:80]!r}: {reason}" if key else str(reason))
        self.key = key
        self.reason = reason


@functools.lru_cache(maxsize=64)
def pattern_keys(keys: tuple[str, ...]) -> PatternKeys:
    """The matcher for one rank_pattern/alpha_pattern (its keys in order), built once per config."""
    return PatternKeys(keys)


@functools.lru_cache(maxsize=256)
def safe_regex(pattern: str) -> SafeRegex:
    return SafeRegex(pattern)


def is_plain(pattern: str) -> bool:
    """No regex syntax but `.`: a dotted module name."""
    return not _SYNTAX.search(pattern)


# --- bounding re's backtracking ------------------------------------------------------------------------------


def _parse(pattern: str) -> object | None:
    if _sre_parser is None:
        return None
    try:
        return _sre_parser.parse(pattern)
    except Exception:  # re.compile accepted it; a private parser that disagrees only costs the bound
        log.debug("could not parse %r to bound its matching; it runs on re", pattern)
        return None


def _safe_length(parsed: object) -> int:
    """The longest text on which `re` takes at most STEP_BUDGET steps (by `_cost`, an upper bound)."""
    if _cost(parsed, 1 << 20) <= STEP_BUDGET:
        return 1 << 62
    lo, hi = 0, 1 << 20  # cost(lo) within budget, cost(hi) not
    if _cost(parsed, 0) > STEP_BUDGET:
        return -1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _cost(parsed, mid) <= STEP_BUDGET:
            lo = mid
        else:
            hi = mid
    return lo


def _cost(items: Iterable[tuple[object, object]], n: int) -> float:
    """An upper bound on the paths `re` may try through `items` on a text of `n` characters: the product of the
    choices at each point (a repeat chooses its count, a branch its alternative), a repeat of a body that itself
    chooses multiplying per iteration (exponential)."""
    total = 1.0
    for op, av in items:
        total = min(total * _node_cost(op, av, n), _CAP)
    return total


def _node_cost(op: object, av: object, n: int) -> float:
    c = _sre
    if op in (c.SUBPATTERN,):
        return _cost(av[3], n)  # type: ignore[index]
    if op is c.BRANCH:
        return min(sum(_cost(alt, n) for alt in av[1]), _CAP)  # type: ignore[index]
    if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
        lo, hi, body = av  # type: ignore[misc]
        most = min(hi, n + 1)
        if lo > most:
            return 1.0
        inner = _cost(body, n)
        if inner <= 1.0:
            return float(most - lo + 1)
        if most * math.log(inner) > math.log(_CAP):
            return _CAP
        return min(sum(inner**i for i in range(most + 1)), _CAP)
    if op in (c.ASSERT, c.ASSERT_NOT):
        return _cost(av[1], n)  # type: ignore[index]
    if op is c.ATOMIC_GROUP:
        return _cost(av, n)  # type: ignore[arg-type]
    if op is c.GROUPREF_EXISTS:
        _, yes, no = av  # type: ignore[misc]
        return min(_cost(yes, n) + (_cost(no, n) if no else 1.0), _CAP)
    if op is c.GROUPREF:
        return float(n + 1)
    return 1.0
