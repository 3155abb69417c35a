"""A linear-time matcher for one regular expression, built from `re`'s own parse: what patterns.SafeRegex runs a
pattern on when `re`'s backtracking could take too long on a name. Its yes/no answer is `re.match`'s or
`re.fullmatch`'s (that answer does not depend on greedy or lazy choices); it covers everything but backreferences,
lookarounds, atomic groups and possessive repeats, which it refuses (PatternTooComplex).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

try:  # the parser and compiler behind `re`: private, but the only complete description of a pattern there is
    from re import _compiler as sre_compiler
    from re import _constants as sre
    from re import _parser as sre_parser
except ImportError:  # pragma: no cover - a Python whose re is laid out otherwise: patterns run on re unbounded
    sre_compiler = sre = sre_parser = None  # type: ignore[assignment]

# States of the automaton, which counted repeats like x{1000} multiply; past it the pattern is refused.
MAX_STATES = 20_000


class PatternTooComplex(ValueError):
    """A pattern whose matching cannot be bounded (or took too long in all); the message says which and why."""


_CHAR, _SPLIT, _ASSERT, _MATCH = range(4)
_ASSERTIONS = (
    frozenset(
        {
            sre.AT_BEGINNING,
            sre.AT_BEGINNING_STRING,
            sre.AT_END,
            sre.AT_END_STRING,
            sre.AT_BOUNDARY,
            sre.AT_NON_BOUNDARY,
        }
    )
    if sre_parser is not None
    else frozenset()
)
_MEMO_LIMIT = 200_000


class Automaton:
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
        c = sre
        if op in (c.LITERAL, c.NOT_LITERAL, c.ANY, c.IN):
            state = self._add(_CHAR, None, then)
            single = sre_parser.State()
            single.flags = flags
            self.tests[state] = (sre_compiler.compile(sre_parser.SubPattern(single, [(op, av)]), flags), {})
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
    c = sre
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
