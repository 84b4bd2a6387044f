"""A loader for the plain subset of YAML that policies are written in, without PyYAML's node graph.

`load_plain(text)` returns (data, index) for a document inside the subset and None for anything else;
the caller then loads with hostwall.yamldoc.load_yaml, which also reports every problem with its line
and path (docs/policy.md "Validation"). Inside the subset the data is PyYAML's: the same values, types
and key order (plain scalars go through PyYAML's own resolver and constructor), checked against
load_yaml on generated documents by tests/unit/test_yamlplain.py. `index` answers only what a valid
policy needs: the line of every item of a top-level list (Rule.line).

The subset: block mappings and block sequences, one entry per line (also `- key: v` and a list at its
key's indentation); flow mappings and lists that close on the line they open; plain scalars made of
[A-Za-z0-9_./+-] words; quoted scalars on one line without escapes (single quotes only outside flow
collections); comments (any printable text) and blank lines. Outside it (→ None): tabs, CR, control
characters, tags, anchors, aliases, merge keys, block or multi-line scalars, document markers,
directives, duplicate keys, keys that are not plain strings or longer than 1000 characters, nesting
deeper than 64 collections, empty list items or flow values, values PyYAML cannot build, and every
syntax error.

Cost: one regex pass per line, one findall per flow line and a Python step per entry of a flow mapping of
scalars and lists of scalars (a rule line; any other flow line a step per token), no node objects (the
tag of a plain scalar memoised as in yamldoc, a plain decimal read without it): ~0.05 s CPU on the
fast level for the 4096-rule max policy (0.064 s with a step per token, same level),
against ~0.235 s for PyYAML's compose and the walk to plain data (docs/benchmarks.md "swap"); a flow
line parsed before is unmarshalled instead (_FLOWS: ~1/10 of its parse).
"""
from __future__ import annotations

import marshal
import re
from typing import Any

import yaml

from hostwall.boundedmemo import BoundedMemo
from hostwall.yamldoc import SCALAR_ERRORS, LineIndex, PathT, plain_tag, scalar_value

__all__ = ["PlainIndex", "clear_flow_memo", "load_plain"]

_WORD = r"[A-Za-z0-9_./+-]+"
_PLAIN = r"[A-Za-z0-9_./][A-Za-z0-9_./+-]*(?: +" + _WORD + r")*"
_KEY = r"[A-Za-z0-9_./][A-Za-z0-9_./+-]*"
# tab, CR, control characters, YAML's other line breaks (NEL, LS, PS) and what it cannot print; other
# non-ASCII text can only be in comments and quoted scalars (every other pattern here is ASCII)
_OUTSIDE = re.compile("[^\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_BLANK = re.compile(r" *(?:#.*)?$")
_ENTRY = re.compile(r"(" + _KEY + r"):(?: +(.*))?$")            # key: [value]
_REST = re.compile(r" *$| +#.*$")                              # what may follow a value
# a scalar value: "..." '...' or a plain scalar
_SCALAR = re.compile(r'"([^"\\]*)"|\'([^\']*)\'|(' + _PLAIN + r")")
# a flow collection's tokens: punctuation, a "quoted" scalar, a plain scalar (a key when ': ' follows),
# any other character (which leaves the subset); _FLOW_LINE finds where a comment starts (atomic: no
# backtracking into other splits of the same text)
_TOKEN = re.compile(r' *(?:([\[\]{},])|("[^"\\]*")|(' + _PLAIN + r")(: )?|(.))")
_FLOW_LINE = re.compile(r'((?: *(?>[\[\]{},]|"[^"\\]*+"|' + _PLAIN + r"(?:: )?))*+)(?: *| +#.*)$")
# The shape of nearly every flow line of a policy (a rule, `defaults`, a peers or ports list): a mapping
# of scalars and lists of scalars, or such a list. One findall splits a mapping into its entries
# (separator, key, "quoted", plain, list body) or any other character, which sends the line to the
# token loop; a list body is checked whole and split by a second findall (docs/benchmarks.md "swap").
_ITEM = r'"[^"\\]*"|' + _PLAIN
_ITEMS = re.compile(r'("[^"\\]*")|(' + _PLAIN + r")")
_BODY = re.compile(r" *(?:(?:" + _ITEM + r")(?: *, *(?:" + _ITEM + r"))*)? *")
_ENTRIES = re.compile(r'([{,]) *(' + _PLAIN + r'): +(?:("[^"\\]*")|(' + _PLAIN + r")|(\[[^\]]*\])) *|(.)")
_W_VALUE, _W_KEY, _W_SEP, _W_OPEN_L, _W_OPEN_M, _W_END = range(6)   # what flow() wants next (OPEN: after [ {)
_STR = "tag:yaml.org,2002:str"
# Bounds inside which PyYAML agrees: libyaml refuses deep flow nesting (and the full loader reports deep
# documents), PyYAML a simple key over 1024 characters; a policy needs a depth of ~5 and short keys
MAX_DEPTH, MAX_KEY = 64, 1000


class _Out(Exception):
    """The document leaves the subset: the caller loads it with the full loader."""


class PlainIndex(LineIndex):
    """The LineIndex of a document loaded by load_plain: item lines of the top-level lists only;
    pos() knows no line (an issue makes the caller load again with the full loader)."""

    __slots__ = ("_items",)

    def __init__(self, items: dict[str, list[int]]):
        super().__init__()
        self._items = items

    def item_lines(self, path: PathT) -> list[int]:
        return list(self._items.get(path[0], ())) if len(path) == 1 else []


def load_plain(text: str) -> tuple[Any, PlainIndex] | None:
    """(data, index) of a top-level mapping inside the subset (module doc), else None."""
    if _OUTSIDE.search(text):
        return None
    lines = [(len(s) - len(s.lstrip(" ")), s.lstrip(" "), no)
             for no, s in enumerate(text.split("\n"), 1) if not _BLANK.match(s)]
    if not lines or lines[0][0] != 0:
        return None
    p = _Parser(lines)
    try:
        data, i = p.mapping(0, 0, top=True)
    except (_Out, RecursionError):
        return None
    if i != len(lines):
        return None
    return data, PlainIndex(p.items)


class _Parser:
    """Recursive descent over the non-blank lines (indent, text without it, 1-based line)."""

    def __init__(self, lines: list[tuple[int, str, int]]):
        self.lines = lines
        self.items: dict[str, list[int]] = {}
        self.last_lines: list[int] = []           # item lines of the list sequence() returned last
        self.keys: set[str] = set()               # plain keys known to be strings
        self.values: dict[str, Any] = {}          # plain scalar -> its value (all immutable), this parse
        self.ctor = yaml.constructor.SafeConstructor()
        self.depth = 0                            # open block collections (MAX_DEPTH)

    # ---- block structure
    def block(self, i: int) -> tuple[Any, int, int]:
        """The block collection starting at line i: (value, next line, line of its first node)."""
        ind, s, no = self.lines[i]
        v: Any
        v, i = self.sequence(i, ind) if _is_item(s) else self.mapping(i, ind)
        return v, i, no

    def _deeper(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Out

    def mapping(self, i: int, ind: int, top: bool = False) -> tuple[dict, int]:
        lines, out = self.lines, {}
        value: Any
        self._deeper()
        while i < len(lines):
            li, s, no = lines[i]
            if li < ind:
                break
            m = _ENTRY.match(s)
            if li > ind or m is None:
                raise _Out
            key = m.group(1)
            if key in out or len(key) > MAX_KEY or plain_tag(key) != _STR:
                raise _Out
            rest = m.group(2)
            i += 1
            if rest and not rest.startswith("#"):
                value, lns = self.inline(rest, no)
                if top and lns is not None:
                    self.items[key] = lns
            elif i < len(lines) and (lines[i][0] > ind or (lines[i][0] == ind and _is_item(lines[i][1]))):
                if lines[i][0] == ind:                   # a list at its key's indentation
                    value, i = self.sequence(i, ind)
                else:
                    value, i, _ = self.block(i)
                if top and isinstance(value, list):
                    self.items[key] = self.last_lines    # the outermost list finished last
            else:
                value = None                             # "key:" alone: null
            out[key] = value
        self.depth -= 1
        return out, i

    def sequence(self, i: int, ind: int) -> tuple[list, int]:
        lines, out, where = self.lines, [], []
        self._deeper()
        while i < len(lines):
            li, s, no = lines[i]
            if li < ind or (li == ind and not _is_item(s)):
                break
            if li > ind:
                raise _Out
            rest = s[1:].lstrip(" ")
            if rest[:1] in ("[", "{"):                   # a flow collection (a rule line): its line only
                value, _ = self.inline(rest, no)
                i += 1
                where.append(no)
            elif not rest or rest.startswith("#"):
                if i + 1 >= len(lines) or lines[i + 1][0] <= ind:
                    raise _Out                           # an empty item
                value, i, first = self.block(i + 1)
                where.append(first)
            elif _is_item(rest):
                raise _Out                               # "- - x": a compact nested list
            elif _ENTRY.match(rest):                     # "- key: value": a mapping at the key's column
                col = li + len(s) - len(rest)
                lines[i] = (col, rest, no)
                value, i = self.mapping(i, col)
                where.append(no)
            else:
                value, _ = self.inline(rest, no)
                i += 1
                where.append(no)
            out.append(value)
        self.last_lines = where
        self.depth -= 1
        return out, i

    # ---- one line's value
    def inline(self, s: str, no: int) -> tuple[Any, list[int] | None]:
        """A value that ends on its line; (value, its items' lines if it is a list)."""
        if s[0] in "[{":
            key = (s, self.depth)
            if (kept := _FLOWS.get(key)) is not None:
                value = marshal.loads(kept)                    # a fresh copy: callers own the data
            else:
                value = self._flow_line(s)
                _keep(key, value)
        else:
            m = _SCALAR.match(s)
            if m is None or not _REST.match(s, m.end()):
                raise _Out
            dq, sq, plain = m.groups()
            value = self.scalar(plain) if plain is not None else dq if dq is not None else sq
        return value, ([no] * len(value) if isinstance(value, list) else None)

    def _flow_line(self, s: str) -> Any:
        if "#" in s:                                           # a comment may follow: cut it off
            m = _FLOW_LINE.match(s)
            if m is None:
                raise _Out
            s = s[:m.end(1)]
        s = s.rstrip(" ")
        if self.depth + 2 < MAX_DEPTH and (flat := self._flat(s)) is not None:
            return flat
        return self.flow(_TOKEN.findall(s))

    def _flat(self, s: str) -> dict | list | None:
        """A flow mapping of scalars and lists of scalars, or a list of scalars, as flow() builds it;
        None for any other line (flow() then decides). About half of flow()'s cost on a rule line: a
        Python step per entry instead of per token."""
        if s[0] == "[":
            return self._flat_list(s[1:-1]) if s[-1] == "]" else None
        toks = _ENTRIES.findall(s)
        if toks.pop()[5] != "}" or not toks or toks[0][0] != "{" or s.count("{") != 1:
            return None                                  # one "{": every later entry follows a ","
        out: dict = {}
        keys, values = self.keys, self.values
        for _, key, dq, plain, lst, other in toks:
            if other:
                return None
            if key not in keys:
                if len(key) > MAX_KEY or plain_tag(key) != _STR:
                    return None
                keys.add(key)
            if plain:
                out[key] = values[plain] if plain in values else self.value(plain)
            elif dq:
                out[key] = dq[1:-1]
            elif (items := self._flat_list(lst[1:-1])) is not None:
                out[key] = items
            else:
                return None
        return out if len(out) == len(toks) else None   # a repeated key: outside the subset

    def _flat_list(self, body: str) -> list | None:
        """The items of a list of scalars from the text between its brackets, or None."""
        if not _BODY.fullmatch(body):
            return None
        values, value = self.values, self.value
        return [dq[1:-1] if dq else values[plain] if plain in values else value(plain)
                for dq, plain in _ITEMS.findall(body)]

    def flow(self, toks: list[tuple[str, str, str, str, str]]) -> Any:
        """A flow collection from its tokens (punctuation, "quoted", plain, ': ' after a plain key, any
        other character), which cover the text without gaps: one pass with a stack, no recursion."""
        stack: list[Any] = []
        root: Any = None
        key = ""
        want = _W_VALUE
        keys, scalar = self.keys, self.scalar
        for p, dq, plain, colon, other in toks:
            if other or want == _W_END:
                raise _Out
            if p:
                if p == ",":
                    if want != _W_SEP:
                        raise _Out
                    want = _W_KEY if type(stack[-1]) is dict else _W_VALUE
                    continue
                if p == "]" or p == "}":
                    if want != _W_SEP and want != _W_OPEN_L and want != _W_OPEN_M:
                        raise _Out
                    top = stack.pop()
                    if (p == "]") is not (type(top) is list):
                        raise _Out
                    want = _W_SEP if stack else _W_END
                    continue
                if want != _W_VALUE and want != _W_OPEN_L:
                    raise _Out
                v: Any = []
                if p == "{":
                    v = {}
                if len(stack) >= MAX_DEPTH - self.depth:
                    raise _Out
                if stack:
                    if type(stack[-1]) is list:
                        stack[-1].append(v)
                    else:
                        stack[-1][key] = v
                else:
                    root = v
                stack.append(v)
                want = _W_OPEN_L if p == "[" else _W_OPEN_M
                continue
            if colon:                                          # a key
                if (want != _W_KEY and want != _W_OPEN_M) or plain in stack[-1] or len(plain) > MAX_KEY:
                    raise _Out
                if plain not in keys:
                    if plain_tag(plain) != _STR:
                        raise _Out
                    keys.add(plain)
                key = plain
                want = _W_VALUE
                continue
            if (want != _W_VALUE and want != _W_OPEN_L) or not stack:
                raise _Out
            v = dq[1:-1] if dq else scalar(plain)
            if type(stack[-1]) is list:
                stack[-1].append(v)
            else:
                stack[-1][key] = v
            want = _W_SEP
        if want != _W_END:
            raise _Out                                         # not closed on its line
        return root

    def value(self, v: str) -> Any:
        """scalar(v), kept for this parse: plain scalars repeat (directions, actions, protocols, ports) and
        their values are immutable (str, int, float, bool, None, dates)."""
        out = self.values[v] = self.scalar(v)
        return out

    def scalar(self, v: str) -> Any:
        """A plain scalar as PyYAML builds it (hostwall.yamldoc.scalar_value, as the full loader does)."""
        if v.isdigit() and v[0] != "0" and v.isascii() and len(v) <= 18:
            return int(v)                                # a plain decimal: YAML 1.1's int, no resolver (longer
                                                         # ones — int()'s 4300-digit limit — take the full path)
        tag = plain_tag(v)
        if tag == _STR:
            return v
        try:
            return scalar_value(self.ctor, tag, v)
        except SCALAR_ERRORS:                            # the full loader reports it with its line
            raise _Out from None


# Flow lines parsed before, by (text, depth: the MAX_DEPTH check reads it): a policy re-read after an
# edit (or one of a few policies applied in turn) parses only its new lines. A value is kept
# marshalled: a hit is one C call that builds a fresh copy (callers own what load_plain returns), and
# the memo holds bytes, which the cyclic GC does not traverse; values marshal cannot write (dates)
# are not kept. Cleared when full (hostwall/boundedmemo.py): at most 4 x 4096 lines (the rule lines of four
# max policies, ~0.54 KB each with its text, measured on the max policy's rules: ~9 MB) and at most 16 MB
# of text and marshalled values (a policy with long flow lines, e.g. an inline list of 60k peers on one
# line, fills it sooner instead of holding more).
_FLOWS: BoundedMemo[tuple[str, int], bytes] = BoundedMemo(4 * 4096, 16 << 20)


def clear_flow_memo() -> None:
    """Forget the parsed flow lines (benchmarks of a cold parse)."""
    _FLOWS.clear()


def _keep(key: tuple[str, int], value: Any) -> None:
    try:
        kept = marshal.dumps(value)
    except ValueError:                               # e.g. a datetime.date: parsed again next time
        return
    _FLOWS.put(key, kept, len(key[0]) + len(kept))


def _is_item(s: str) -> bool:
    return s[:1] == "-" and (len(s) == 1 or s[1] == " ")
