"""GBNF grammar parser (llama.cpp's grammar format) into a small rule table.

Syntax, as llama.cpp's `llama-grammar.cpp` accepts it: `name ::= alternatives` rules (names
of letters, digits, '-' and '_'), `|` alternation, sequences, `( ... )` groups, `"literals"`,
`[...]` / `[^...]` character classes with ranges, `.` (any character), the postfix
operators `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`, escapes `\\x.. \\u.... \\U........ \\t \\n \\r
\\\\ \\" \\[ \\] \\-`, and `#` comments. A rule ends at a newline unless the newline is inside a
group or follows `|`/`::=`. Grammars work on Unicode code points, not bytes.

Errors raise `GrammarError` (a ValueError; the server maps it to HTTP 400) with a line and
column: syntax errors, undefined rules, a missing `root`, left recursion, token references
(`<...>`, not supported here) and absurd repetition counts. Grammars over a `GrammarLimits`
bound (text size, nesting, rules, alternatives, elements; see limits.py) raise
`GrammarLimitError` as soon as the parser gets there, before any work that grows with them.
"""
from __future__ import annotations

from dataclasses import dataclass

from ggserve.engine.grammar.limits import DEFAULT_LIMITS, GrammarLimits

MAX_REPETITIONS = DEFAULT_LIMITS.max_repetitions  # llama.cpp's MAX_REPETITION_THRESHOLD
MAX_CODEPOINT = 0x10FFFF
MAX_RULES = DEFAULT_LIMITS.max_rules


class GrammarError(ValueError):
    """An invalid grammar (or JSON schema that cannot be turned into one)."""


class GrammarLimitError(GrammarError):
    """A grammar or JSON schema beyond a `GrammarLimits` bound (too big, too deep, too costly)."""


@dataclass(frozen=True)
class CharClass:
    """Matches one code point: inside any of `ranges` (inclusive), or outside all if negated."""

    ranges: tuple[tuple[int, int], ...]
    negated: bool = False

    def matches(self, cp: int) -> bool:
        inside = any(lo <= cp <= hi for lo, hi in self.ranges)
        return inside != self.negated


ANY_CHAR = CharClass(((0, MAX_CODEPOINT),), False)


@dataclass(frozen=True)
class RuleRef:
    rule_id: int


Element = CharClass | RuleRef
Alternative = tuple[Element, ...]


@dataclass
class Grammar:
    """rules[rule_id] = list of alternatives, each a tuple of elements; `root_id` is `root`."""

    rules: list[list[Alternative]]
    names: list[str]
    root_id: int
    limits: GrammarLimits = DEFAULT_LIMITS  # what it was parsed under; the matcher applies them too

    def rule_named(self, name: str) -> list[Alternative]:
        return self.rules[self.names.index(name)]


def _is_word(ch: str) -> bool:
    return len(ch) == 1 and ch.isascii() and (ch.isalnum() or ch in "-_")


class _Parser:
    def __init__(self, text: str, limits: GrammarLimits):
        self.text = text
        self.limits = limits
        self.pos = 0
        self.depth = 0  # open ( ... ) groups
        self.n_alternatives = 0
        self.n_elements = 0  # in every sequence and repetition helper so far
        self.ids: dict[str, int] = {}
        self.names: list[str] = []
        self.rules: dict[int, list[Alternative]] = {}
        self.first_use: dict[int, int] = {}

    # -- helpers ----------------------------------------------------------------------------
    def error(self, message: str, pos: int | None = None) -> GrammarError:
        pos = self.pos if pos is None else pos
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        near = self.text[pos:pos + 20].replace("\n", "\\n")
        return GrammarError(f"grammar error at line {line}, column {col}: {message} (near {near!r})")

    def peek(self, offset: int = 0) -> str:
        i = self.pos + offset
        return self.text[i] if i < len(self.text) else ""

    def skip_space(self, newline_ok: bool) -> None:
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch == "#":
                while self.pos < len(text) and text[self.pos] not in "\r\n":
                    self.pos += 1
            elif ch in " \t" or (newline_ok and ch in "\r\n"):
                self.pos += 1
            else:
                break

    def limit_error(self, message: str) -> GrammarLimitError:
        line = self.text.count("\n", 0, self.pos) + 1
        return GrammarLimitError(f"grammar error at line {line}: {message}")

    def symbol(self, name: str) -> int:
        if name not in self.ids:
            if len(self.names) >= self.limits.max_rules:
                raise self.limit_error(f"the grammar has (or expands to) more than {self.limits.max_rules} rules")
            self.ids[name] = len(self.names)
            self.names.append(name)
        return self.ids[name]

    def fresh_symbol(self, base: str) -> int:
        return self.symbol(f"{base}_{len(self.names)}")

    def count(self, alternatives: int, elements: int) -> None:
        """Adds to the totals; raises once one is over its limit."""
        self.n_alternatives += alternatives
        self.n_elements += elements
        if self.n_alternatives > self.limits.max_alternatives:
            raise self.limit_error(f"the grammar has (or expands to) more than {self.limits.max_alternatives} "
                                   "alternatives")
        if self.n_elements > self.limits.max_elements:
            raise self.limit_error(f"the grammar has (or expands to) more than {self.limits.max_elements} elements")

    def parse_name(self) -> str:
        start = self.pos
        while _is_word(self.peek()):
            self.pos += 1
        if self.pos == start:
            raise self.error("expecting a rule name")
        return self.text[start:self.pos]

    def parse_int(self) -> int:
        start = self.pos
        while self.peek().isdigit() and self.peek().isascii():
            self.pos += 1
        if self.pos == start:
            raise self.error("expecting an integer")
        return int(self.text[start:self.pos])

    def parse_hex(self, size: int) -> int:
        digits = self.text[self.pos:self.pos + size]
        if len(digits) != size or any(c not in "0123456789abcdefABCDEF" for c in digits):
            raise self.error(f"expecting {size} hex digits")
        self.pos += size
        return int(digits, 16)

    def parse_char(self) -> int:
        ch = self.peek()
        if not ch:
            raise self.error("unexpected end of input")
        if ch != "\\":
            self.pos += 1
            return ord(ch)
        esc = self.peek(1)
        self.pos += 2
        simple = {"t": 9, "r": 13, "n": 10, "\\": 92, '"': 34, "[": 91, "]": 93, "-": 45}
        if esc in simple:
            return simple[esc]
        sizes = {"x": 2, "u": 4, "U": 8}
        if esc in sizes:
            return self.parse_hex(sizes[esc])
        raise self.error(f"unknown escape '\\{esc}'", self.pos - 2)

    # -- grammar structure ------------------------------------------------------------------
    def parse_alternates(self, rule_name: str, rule_id: int, nested: bool) -> None:
        alternatives = [self.parse_sequence(rule_name, nested)]
        while self.peek() == "|":
            self.pos += 1
            self.skip_space(True)
            alternatives.append(self.parse_sequence(rule_name, nested))
        self.count(len(alternatives), 0)
        self.rules[rule_id] = [tuple(a) for a in alternatives]

    def repeat(self, seq: list[Element], last_start: int, rule_name: str, lo: int, hi: int | None) -> None:
        """Rewrites the last item S into S{lo,hi} with helper rules, like llama.cpp."""
        if last_start == len(seq):
            raise self.error("expecting an item before a repetition operator")
        item = seq[last_start:]
        del seq[last_start:]
        # check before copying (S{2000} of a long literal is big): the helpers' elements are
        # counted here, the copies in `seq` by parse_sequence (as its net growth)
        helpers = 1 if hi is None else hi - lo
        self.count(2 * helpers, (len(item) + 1) * helpers + len(item) * lo)
        self.n_elements -= len(item) * lo
        seq.extend(item * lo)
        if hi is None:  # S* helper: S' ::= S S' |
            helper = self.fresh_symbol(rule_name)
            self.rules[helper] = [tuple(item) + (RuleRef(helper),), ()]
            seq.append(RuleRef(helper))
            return
        last_helper = None
        for _ in range(hi - lo):  # S'(1) ::= S | ; S'(x) ::= S S'(x-1) |
            helper = self.fresh_symbol(rule_name)
            tail = (RuleRef(last_helper),) if last_helper is not None else ()
            self.rules[helper] = [tuple(item) + tail, ()]
            last_helper = helper
        if last_helper is not None:
            seq.append(RuleRef(last_helper))

    def parse_sequence(self, rule_name: str, nested: bool) -> list[Element]:
        seq: list[Element] = []
        last_start = 0
        while self.pos < len(self.text):
            ch = self.peek()
            before = len(seq)
            if ch == '"':
                self.pos += 1
                last_start = len(seq)
                while self.peek() != '"':
                    if not self.peek():
                        raise self.error("unterminated string literal")
                    cp = self.parse_char()
                    seq.append(CharClass(((cp, cp),)))
                self.pos += 1
            elif ch == "[":
                start = self.pos
                self.pos += 1
                negated = self.peek() == "^"
                if negated:
                    self.pos += 1
                ranges = []
                while self.peek() != "]":
                    if not self.peek():
                        raise self.error("unterminated character class", start)
                    lo = self.parse_char()
                    hi = lo
                    if self.peek() == "-" and self.peek(1) not in ("]", ""):
                        self.pos += 1
                        hi = self.parse_char()
                    if hi < lo:
                        raise self.error("character range is out of order")
                    ranges.append((lo, hi))
                self.pos += 1
                last_start = len(seq)
                seq.append(CharClass(tuple(ranges), negated))
            elif ch in "<!":
                raise self.error("token references (<...>) are not supported")
            elif _is_word(ch):
                name_pos = self.pos
                name = self.parse_name()
                rule_id = self.symbol(name)
                self.first_use.setdefault(rule_id, name_pos)
                last_start = len(seq)
                seq.append(RuleRef(rule_id))
            elif ch == "(":
                open_pos = self.pos
                if self.depth >= self.limits.max_nesting:
                    raise self.limit_error(f"grammar nested deeper than {self.limits.max_nesting} levels")
                self.depth += 1
                self.pos += 1
                self.skip_space(True)
                sub = self.fresh_symbol(rule_name)
                self.parse_alternates(rule_name, sub, True)
                if self.peek() != ")":
                    raise self.error("expecting ')' to close the group", open_pos if not self.peek() else None)
                self.depth -= 1
                self.pos += 1
                last_start = len(seq)
                seq.append(RuleRef(sub))
            elif ch == ".":
                self.pos += 1
                last_start = len(seq)
                seq.append(ANY_CHAR)
            elif ch in "*+?":
                self.pos += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
                self.repeat(seq, last_start, rule_name, lo, hi)
            elif ch == "{":
                self.pos += 1
                self.skip_space(nested)
                lo = self.parse_int()
                self.skip_space(nested)
                hi: int | None = lo
                if self.peek() == ",":
                    self.pos += 1
                    self.skip_space(nested)
                    hi = self.parse_int() if self.peek().isdigit() else None
                    self.skip_space(nested)
                if self.peek() != "}":
                    raise self.error("expecting '}'")
                self.pos += 1
                max_repetitions = self.limits.max_repetitions
                if lo > max_repetitions:
                    raise self.error(f"repetition count exceeds {max_repetitions}")
                if hi is not None and hi > max_repetitions:
                    hi = None  # llama.cpp treats a huge maximum as unbounded
                if hi is not None and hi < lo:
                    raise self.error("repetition maximum is below the minimum")
                self.repeat(seq, last_start, rule_name, lo, hi)
            else:
                break
            self.count(0, len(seq) - before)
            self.skip_space(nested)
        return seq

    def parse_rule(self) -> None:
        name = self.parse_name()
        self.skip_space(False)
        rule_id = self.symbol(name)
        if not self.text.startswith("::=", self.pos):
            raise self.error("expecting '::='")
        # a rule defined twice keeps its last definition, as in llama.cpp
        self.pos += 3
        self.skip_space(True)
        self.parse_alternates(name, rule_id, False)
        ch = self.peek()
        if ch == "\r":
            self.pos += 2 if self.peek(1) == "\n" else 1
        elif ch == "\n":
            self.pos += 1
        elif ch:
            raise self.error("expecting a newline or the end of the grammar")
        self.skip_space(True)

    def parse(self) -> Grammar:
        self.skip_space(True)
        if self.pos >= len(self.text):
            raise self.error("the grammar is empty")
        while self.pos < len(self.text):
            self.parse_rule()
        for rule_id, name in enumerate(self.names):
            if rule_id not in self.rules:
                raise self.error(f"undefined rule '{name}'", self.first_use.get(rule_id, 0))
        if "root" not in self.ids:
            raise GrammarError("grammar does not define a 'root' rule")
        rules = [self.rules[i] for i in range(len(self.names))]
        grammar = Grammar(rules, list(self.names), self.ids["root"], self.limits)
        check_left_recursion(grammar)
        return grammar


def nullable_rules(grammar: Grammar) -> list[bool]:
    """Which rules can match the empty string (worklist: linear in the grammar's size)."""
    nullable = [False] * len(grammar.rules)
    waiting: list[int] = []  # per all-reference alternative: references not yet known nullable
    owner: list[int] = []  # ... and its rule
    users: list[list[int]] = [[] for _ in grammar.rules]  # rule -> such alternatives using it
    ready: list[int] = []  # rules known nullable, not yet propagated
    for rule_id, alternatives in enumerate(grammar.rules):
        for alt in alternatives:
            if not alt:
                ready.append(rule_id)
            elif all(isinstance(e, RuleRef) for e in alt):
                for element in alt:
                    users[element.rule_id].append(len(waiting))
                waiting.append(len(alt))
                owner.append(rule_id)
    while ready:
        rule_id = ready.pop()
        if nullable[rule_id]:
            continue
        nullable[rule_id] = True
        for index in users[rule_id]:
            waiting[index] -= 1
            if waiting[index] == 0:
                ready.append(owner[index])
    return nullable


def check_left_recursion(grammar: Grammar) -> None:
    """A rule that can reach itself without consuming input would loop forever: reject."""
    nullable = nullable_rules(grammar)
    starts: list[list[int]] = []
    for alternatives in grammar.rules:
        first: set[int] = set()
        for alt in alternatives:
            for element in alt:
                if not isinstance(element, RuleRef):
                    break
                first.add(element.rule_id)
                if not nullable[element.rule_id]:
                    break
        starts.append(sorted(first))
    state = [0] * len(grammar.rules)  # 0 new, 1 on the DFS path, 2 done
    for root in range(len(grammar.rules)):
        if state[root]:
            continue
        state[root] = 1
        path = [(root, iter(starts[root]))]  # explicit DFS stack: rule chains may be long
        while path:
            rule_id, pending = path[-1]
            for nxt in pending:
                if state[nxt] == 1:
                    raise GrammarError(f"left recursion detected in rule '{grammar.names[nxt]}'")
                if state[nxt] == 0:
                    state[nxt] = 1
                    path.append((nxt, iter(starts[nxt])))
                    break
            else:
                state[rule_id] = 2
                path.pop()


def parse_grammar(text: str, *, limits: GrammarLimits | None = None) -> Grammar:
    """Parses GBNF text; raises GrammarError with a position on any problem, GrammarLimitError
    (a GrammarError) when the grammar is beyond `limits` (default: GrammarLimits())."""
    if not isinstance(text, str):
        raise GrammarError("grammar must be a string")
    limits = DEFAULT_LIMITS if limits is None else limits
    if len(text) > limits.max_grammar_bytes or len(text.encode("utf-8", "surrogatepass")) > limits.max_grammar_bytes:
        raise GrammarLimitError(f"the grammar is longer than {limits.max_grammar_bytes} bytes")
    try:
        return _Parser(text, limits).parse()
    except RecursionError:  # a safety net: nesting is bounded well below the recursion limit
        raise GrammarLimitError("grammar nested too deeply to parse") from None
