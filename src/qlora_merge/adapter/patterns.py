"""Regular expressions from adapter_config.json, matched against module names as PEFT matches them, in bounded time.

PEFT reads several config fields as regular expressions (target_modules or exclude_modules given as a string,
rank_pattern/alpha_pattern keys, layers_pattern, modules_to_save entries) and runs them with Python's backtracking
`re`, which takes exponential time on patterns like `(.*.*)*X` and polynomial time of high degree on `.*.*.*.*X`.
A config is input, so each pattern is first given a bound on the backtracking steps `re` can take on a name of a
given length, from its parsed form: a pattern within budget runs on `re` itself (exact, every feature); one past it
runs on a linear-time automaton built from the same parse (the yes/no answer of a regex does not depend on greedy
or lazy choices, so it equals `re`'s), which covers everything but backreferences, lookarounds, atomic groups and
possessive repeats. A pattern past the budget that needs one of those is refused rather than run.

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

log = logging.getLogger(__name__)

try:  # the parser and compiler behind `re`: private, but the only complete description of a pattern there is
    from re import _compiler as _sre_compiler
    from re import _constants as _sre
    from re import _parser as _sre_parser
except ImportError:  # pragma: no cover - a Python whose re is laid out otherwise: patterns run on re unbounded
    _sre_parser = None

# Backtracking steps `re` may take on one name; past it a pattern runs on the automaton. At tens of nanoseconds a
# step this keeps the worst case near a millisecond per name.
STEP_BUDGET = 20_000
# States of the automaton, which counted repeats like x{1000} multiply; past it the pattern is refused.
MAX_STATES = 20_000
# Wall time one set of patterns may spend matching module names in all, every single match being bounded already:
# only thousands of costly patterns over thousands of modules get near it.
TIME_BUDGET_S = 30.0
# Regex syntax other than `.`: a key without any is a dotted name, matched without a regex engine.
_SYNTAX = re.compile(r"[\\^$*+?{}\[\]|()]")
_CAP = 1e30


class PatternTooComplex(ValueError):
    """A pattern whose matching cannot be bounded (or took too long in all); the message says which and why."""


class SafeRegex:
    """One regular expression, matched with `re.match`/`re.fullmatch`'s yes/no answer in bounded time."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.compiled = re.compile(pattern)  # re.error for an invalid pattern, as PEFT would raise
        self.parsed = _parse(pattern)
        # the longest name `re` can match within budget (all names when the pattern has no costly structure)
        self.safe_length = _safe_length(self.parsed) if self.parsed is not None else 1 << 62
        self._automaton: _Automaton | None = None
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
                self._automaton = _Automaton(self.parsed)
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


# --- the linear-time automaton ---------------------------------------------------------------------------------

_CHAR, _SPLIT, _ASSERT, _MATCH = range(4)
_ASSERTIONS = (
    frozenset(
        {
            _sre.AT_BEGINNING,
            _sre.AT_BEGINNING_STRING,
            _sre.AT_END,
            _sre.AT_END_STRING,
            _sre.AT_BOUNDARY,
            _sre.AT_NON_BOUNDARY,
        }
    )
    if _sre_parser is not None
    else frozenset()
)
_MEMO_LIMIT = 200_000


class _Automaton:
    """Thompson's construction from re's own parse, simulated one character at a time with the state sets
    memoised (a lazily built DFA): linear in the text whatever the pattern. Character tests are single-character
    patterns compiled by re from the pattern's own nodes and flags, so classes, case folding and `.` are re's."""

    def __init__(self, parsed: object) -> None:
        if parsed is None:
            raise PatternTooComplex("it could not be parsed")
        self.kind: list[int] = []
        self.arg: list[object] = []
        self.out1: list[int] = []
        self.out2: list[int] = []
        self.tests: dict[int, tuple[re.Pattern[str], dict[str, bool]]] = {}
        self.has_assertions = False
        flags = parsed.state.flags  # type: ignore[attr-defined]
        self.accept = self._add(_MATCH)
        self.start = self._sequence(parsed, flags, self.accept)
        self.memo: dict[object, frozenset[int]] = {}

    def _add(self, kind: int, arg: object = None, out1: int = -1, out2: int = -1) -> int:
        if len(self.kind) >= MAX_STATES:
            raise PatternTooComplex(f"needs over {MAX_STATES} automaton states (large counted repeats)")
        self.kind.append(kind)
        self.arg.append(arg)
        self.out1.append(out1)
        self.out2.append(out2)
        return len(self.kind) - 1

    def _sequence(self, items: Iterable[tuple[object, object]], flags: int, then: int) -> int:
        for op, av in reversed(list(items)):
            then = self._node(op, av, flags, then)
        return then

    def _node(self, op: object, av: object, flags: int, then: int) -> int:
        c = _sre
        if op in (c.LITERAL, c.NOT_LITERAL, c.ANY, c.IN):
            state = self._add(_CHAR, None, then)
            single = _sre_parser.State()
            single.flags = flags
            self.tests[state] = (_sre_compiler.compile(_sre_parser.SubPattern(single, [(op, av)]), flags), {})
            return state
        if op is c.SUBPATTERN:
            _, add, remove, body = av  # type: ignore[misc]
            return self._sequence(body, (flags | add) & ~remove, then)
        if op is c.BRANCH:
            starts = [self._sequence(alt, flags, then) for alt in av[1]]  # type: ignore[index]
            state = starts[-1]
            for other in reversed(starts[:-1]):
                state = self._add(_SPLIT, None, other, state)
            return state
        if op in (c.MAX_REPEAT, c.MIN_REPEAT):  # greedy or lazy: the same yes/no answer
            lo, hi, body = av  # type: ignore[misc]
            if hi == c.MAXREPEAT:
                loop = self._add(_SPLIT, None, -1, then)
                self.out1[loop] = self._sequence(body, flags, loop)
                start = loop
            else:
                start = then
                for _ in range(hi - lo):
                    start = self._add(_SPLIT, None, self._sequence(body, flags, start), then)
            for _ in range(lo):
                start = self._sequence(body, flags, start)
            return start
        if op is c.AT and av in _ASSERTIONS:
            self.has_assertions = True
            return self._add(_ASSERT, (av, flags), then)
        names = {
            c.ASSERT: "a lookaround",
            c.ASSERT_NOT: "a lookaround",
            c.GROUPREF: "a backreference",
            c.GROUPREF_EXISTS: "a conditional group",
            c.ATOMIC_GROUP: "an atomic group",
            c.POSSESSIVE_REPEAT: "a possessive repeat",
        }
        raise PatternTooComplex(f"uses {names.get(op, str(op))}, which only the backtracking matcher supports")

    def run(self, text: str, full: bool) -> bool:
        current = self._closure((self.start,), self._context(text, 0))
        for i, ch in enumerate(text):
            if not current:
                return False
            if not full and self.accept in current:
                return True
            context = self._context(text, i + 1)
            key = (current, ch, context)
            following = self.memo.get(key)
            if following is None:
                moved = [self.out1[s] for s in current if self.kind[s] == _CHAR and self._test(s, ch)]
                following = self._closure(moved, context)
                if len(self.memo) > _MEMO_LIMIT:
                    self.memo.clear()
                self.memo[key] = following
            current = following
        return self.accept in current

    def _test(self, state: int, ch: str) -> bool:
        compiled, seen = self.tests[state]
        result = seen.get(ch)
        if result is None:
            result = seen[ch] = compiled.fullmatch(ch) is not None
        return result

    def _context(self, text: str, p: int) -> tuple[object, ...] | None:
        """What the assertions at position p can depend on."""
        if not self.has_assertions:
            return None
        n = len(text)
        return (p == 0, p == n, p == n - 1, text[p - 1] if p > 0 else None, text[p] if p < n else None)

    def _closure(self, states: Iterable[int], context: tuple[object, ...] | None) -> frozenset[int]:
        stack = list(states)
        seen: set[int] = set()
        while stack:
            state = stack.pop()
            if state in seen:
                continue
            seen.add(state)
            kind = self.kind[state]
            if kind == _SPLIT:
                stack.append(self.out2[state])
                stack.append(self.out1[state])
            elif kind == _ASSERT and _holds(self.arg[state], context):  # type: ignore[arg-type]
                stack.append(self.out1[state])
        return frozenset(s for s in seen if self.kind[s] in (_CHAR, _MATCH))


def _holds(assertion: tuple[object, int], context: tuple[object, ...] | None) -> bool:
    """re's zero-width assertions (sre's SRE_AT_*), from the position's context."""
    assert context is not None
    code, flags = assertion
    at_start, at_end, before_last, prev, nxt = context
    c = _sre
    multiline = bool(flags & c.SRE_FLAG_MULTILINE)
    if code is c.AT_BEGINNING_STRING:
        return bool(at_start)
    if code is c.AT_BEGINNING:
        return bool(at_start) or (multiline and prev == "\n")
    if code is c.AT_END_STRING:
        return bool(at_end)
    if code is c.AT_END:
        return bool(at_end) or (multiline and nxt == "\n") or (bool(before_last) and nxt == "\n")
    if code in (c.AT_BOUNDARY, c.AT_NON_BOUNDARY):
        if at_start and at_end:  # sre: no boundary, and no non-boundary, in an empty string
            return False
        ascii_only = bool(flags & c.SRE_FLAG_ASCII)
        boundary = _word(prev, ascii_only) != _word(nxt, ascii_only)
        return boundary if code is c.AT_BOUNDARY else not boundary
    raise AssertionError(code)  # _ASSERTIONS lists every code handled above


def _word(ch: object, ascii_only: bool) -> bool:
    if not isinstance(ch, str):
        return False
    if ascii_only and not ch.isascii():
        return False
    return ch.isalnum() or ch == "_"
