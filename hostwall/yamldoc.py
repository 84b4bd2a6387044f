"""YAML documents with source locations, and the ordered error list every loader reports into.

Shared by the policy (hostwall.enforcer.validation) and the collector's config: nothing here raises
on bad input; every problem goes into an `Issues` collector with a path ("rules[3].ports[1]") and,
when known, a 1-based line, so one load reports every error (docs/policy.md "Validation").
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

_MAX_NODES = 5_000_000           # YAML nodes visited (alias bombs stop here)

PathT = tuple[Any, ...]


# ---------------------------------------------------------------- issues

@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem: where (file, line, path) and what to do about it, as one line."""
    path: str
    line: int | None
    message: str
    file: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PolicyError(Exception):
    """Raised once per load with every issue found; str() lists them one per line."""

    def __init__(self, issues: Iterable[PolicyIssue]):
        self.issues: list[PolicyIssue] = list(issues)
        super().__init__("\n".join(map(str, self.issues)))

    def __reduce__(self):
        return (type(self), (self.issues,))


def fmt_path(path: Sequence[Any]) -> str:
    """('rules', 3, 'ports', 1) -> 'rules[3].ports[1]'."""
    out: list[str] = []
    for p in path:
        if isinstance(p, int) and not isinstance(p, bool):
            out.append(f"[{p}]")
        else:
            out.append(f".{p}" if out else str(p))
    return "".join(out)


class LineIndex:
    """Path -> (1-based line, 0-based column), looked up lazily in the composed YAML node graph.

    A mapping entry resolves to its key node (a block list's items start below its key; the key line
    is where users look), a list item to its value node; a missing path falls back to the nearest
    existing ancestor. Cost: O(depth × keys per mapping) per lookup, nothing per node up front.
    Columns only order issues that share a line.
    """

    __slots__ = ("root", "_key")

    def __init__(self, root: yaml.Node | None = None, key_of: Callable[[yaml.ScalarNode], Any] | None = None):
        self.root = root
        self._key = key_of or (lambda n: n.value)

    def pos(self, path: PathT) -> tuple[int | None, int]:
        node = self.root
        if node is None:
            return None, 0
        best = node.start_mark
        for p in path:
            if isinstance(node, yaml.MappingNode):
                for k_node, v_node in reversed(node.value):       # last wins (explicit over merged)
                    if isinstance(k_node, yaml.ScalarNode) and self._key(k_node) == p:
                        best, node = k_node.start_mark, v_node
                        break
                else:
                    break
            elif isinstance(node, yaml.SequenceNode) and isinstance(p, int) and 0 <= p < len(node.value):
                node = node.value[p]
                best = node.start_mark
            else:
                break
        return best.line + 1, best.column

    def line(self, path: PathT) -> int | None:
        return self.pos(path)[0]

    def item_lines(self, path: PathT) -> list[int]:
        """Line of every item of the list at `path` (one walk for all; [] if it is not a list)."""
        node = self.root
        for p in path:
            if not isinstance(node, yaml.MappingNode):
                return []
            node = next((v for k, v in reversed(node.value)
                         if isinstance(k, yaml.ScalarNode) and self._key(k) == p), None)
        if not isinstance(node, yaml.SequenceNode):
            return []
        return [n.start_mark.line + 1 for n in node.value]


class Issues:
    """Ordered, de-duplicated issue collector bound to one policy source."""

    def __init__(self, source: str, index: LineIndex | None = None):
        self.source = source
        self.index = index or LineIndex()
        self._items: list[tuple[tuple, PolicyIssue]] = []
        self._seen: set[tuple] = set()
        self._bad: set[PathT] = set()          # exact paths with an issue
        self._tainted: set[PathT] = set()      # those paths and all their ancestors
        self._files: dict[str, int] = {source: 0}

    def add(self, path: PathT, message: str, *, line: int | None = None, file: str | None = None,
            use_index: bool = True) -> None:
        path = tuple(path)
        file = file or self.source
        col = 0
        if line is None and use_index and file == self.source:
            line, col = self.index.pos(path)
        ptxt = fmt_path(path)
        ident = (file, line, ptxt, message)
        if ident in self._seen:
            return
        self._seen.add(ident)
        order = self._files.setdefault(file, len(self._files))
        sort_key = (order, line if line is not None else math.inf, col, len(self._items))
        self._items.append((sort_key, PolicyIssue(ptxt, line, message, file)))
        self._bad.add(path)
        for i in range(len(path) + 1):
            self._tainted.add(path[:i])

    def bad(self, path: PathT) -> bool:
        """True if an issue was recorded at exactly this path."""
        return tuple(path) in self._bad

    def tainted(self, path: PathT) -> bool:
        """True if an issue was recorded at this path or anywhere below it."""
        return tuple(path) in self._tainted

    def __len__(self) -> int:
        return len(self._items)

    def sorted(self) -> list[PolicyIssue]:
        """Issues by file (policy first), then line; line-less issues last within their file."""
        return [i for _, i in sorted(self._items, key=lambda t: t[0])]


# ---------------------------------------------------------------- YAML with lines

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR_TAG, _MAP_TAG, _SEQ_TAG = (_BaseLoader.DEFAULT_SCALAR_TAG, _BaseLoader.DEFAULT_MAPPING_TAG,
                                _BaseLoader.DEFAULT_SEQUENCE_TAG)
_RESOLVED: dict[str, str] = {}     # plain scalar's text -> its implicit tag
_RESOLVED_MAX = 1 << 16


def clear_tag_memo() -> None:
    """Forget the memo of implicit scalar tags (benchmarks of a cold parse)."""
    _RESOLVED.clear()


_RESOLVER = yaml.resolver.Resolver()      # the safe loaders' resolver class (CSafeLoader's too)


def plain_tag(value: str) -> str:
    """The implicit tag of a plain scalar with this text (memoised; shared with hostwall.yamlplain)."""
    tag = _RESOLVED.get(value)
    if tag is None:
        tag = _RESOLVER.resolve(yaml.ScalarNode, value, (True, False))
        if len(_RESOLVED) < _RESOLVED_MAX:
            _RESOLVED[value] = tag
    return tag


# What building a scalar can raise besides a YAML error: e.g. the timestamp 2001-02-29 (ValueError)
SCALAR_ERRORS = (yaml.YAMLError, ValueError, OverflowError)


def scalar_value(ctor: yaml.constructor.SafeConstructor, tag: str, value: str) -> Any:
    """A non-string scalar as PyYAML's safe constructor builds it, a plain decimal without it (YAML 1.1
    reads 0-prefixed as octal). Shared with hostwall.yamlplain, which must give exactly these values.
    Raises one of SCALAR_ERRORS for a value that cannot be built."""
    if tag == _INT_TAG and value.isascii() and value.isdigit() and (value[0] != "0" or value == "0"):
        return int(value)
    return ctor.construct_object(yaml.ScalarNode(tag, value))


class _Loader(_BaseLoader):  # type: ignore[valid-type,misc]
    """The safe loader with a memo of the implicit tag of a plain scalar: keys and values such as `name`,
    `direction`, `ingress` repeat in every rule, and the resolver's regexes cost ~4 µs a scalar. A plain
    scalar's tag depends only on its text, any other scalar is a string, and collections get the default
    tags (the safe loader has no path resolvers), so no call here reaches PyYAML's resolver but a miss."""

    def resolve(self, kind, value, implicit):
        if kind is yaml.ScalarNode:
            if not implicit[0]:
                return _STR_TAG                # quoted or '!'-tagged: the resolver's default, no regexes
            return plain_tag(value)
        return _MAP_TAG if kind is yaml.MappingNode else _SEQ_TAG

    # The composer calls these once per node; with no path resolvers they only return. C callables that
    # ignore their arguments instead of Python frames: ~0.3 µs a node (2 × 60k for the max policy).
    descend_resolver = staticmethod(slice)      # (parent, index)
    ascend_resolver = staticmethod(tuple)       # ()


assert not _BaseLoader.yaml_path_resolvers      # what makes a tag depend on the text alone
_FLATTEN_TAGS = frozenset({"tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"})
_INT_TAG = "tag:yaml.org,2002:int"
_COLLECTION_TAGS = frozenset({_MAP_TAG, _SEQ_TAG})
_MISSING = object()


def _short(v: Any, limit: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _key_reader(ctor: yaml.constructor.SafeConstructor) -> Callable[[yaml.ScalarNode], Any]:
    """The Python key of a scalar key node (_MISSING if unusable); used by _Tree and LineIndex.

    A closure over the constructor only: the LineIndex stored in Issues must not reach back to the
    _Tree (whose `issues` points to that Issues), or the whole node graph (~250k objects for the max
    policy) would sit in a reference cycle until the next cyclic collection, which then costs
    ~0.15 s in whatever code runs next instead of being freed by reference counting.
    """
    construct = ctor.construct_object

    def key_of(node: yaml.ScalarNode) -> Any:
        if node.tag == _STR_TAG:
            return node.value
        try:
            key = construct(node)
            hash(key)
            return key
        except (yaml.YAMLError, TypeError):
            return _MISSING
    return key_of


class _Tree:
    """Turns a composed node graph into plain Python data; reports duplicate keys and bad tags.

    The current path is a mutable stack, turned into a tuple only when an issue is reported, so
    the walk costs about as much as PyYAML's own constructor.
    """

    def __init__(self, issues: Issues):
        self.issues = issues
        self.ctor = yaml.constructor.SafeConstructor()
        self.key_of = _key_reader(self.ctor)
        self.active: set[int] = set()
        self.path: list[Any] = []
        self.nodes = 0

    def _issue(self, message: str, *extra: Any, line: int | None = None) -> None:
        self.issues.add(tuple(self.path) + extra, message, line=line)

    def build(self, node: yaml.Node) -> Any:
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise _TooBig()
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _STR_TAG:
                return node.value                 # fast path: most scalars are strings
            try:
                return scalar_value(self.ctor, node.tag, node.value)
            except SCALAR_ERRORS as e:
                self._issue(f"cannot read value {node.value!r} ({getattr(e, 'problem', None) or e}); "
                            "use a plain value without YAML tags")
                return None
        if node.tag not in _COLLECTION_TAGS:
            self._issue(f"unsupported YAML tag {node.tag!r}; use a plain mapping or list")
            return None
        if id(node) in self.active:
            self._issue("recursive YAML alias; expand it")
            return None
        self.active.add(id(node))
        path = self.path
        try:
            if isinstance(node, yaml.SequenceNode):
                out_l = []
                inline = 0
                for i, n in enumerate(node.value):
                    if n.tag == _STR_TAG and type(n) is yaml.ScalarNode:     # build()'s fast path, inline
                        inline += 1
                        out_l.append(n.value)
                        continue
                    path.append(i)
                    out_l.append(self.build(n))
                    path.pop()
                self._count(inline)
                return out_l
            assert isinstance(node, yaml.MappingNode)     # the only other collection node
            return self._mapping(node)
        finally:
            self.active.discard(id(node))

    def _count(self, n: int = 1) -> None:
        self.nodes += n
        if self.nodes > _MAX_NODES:
            raise _TooBig()

    def _mapping(self, node: yaml.MappingNode) -> dict:
        pairs = node.value
        keys = [k.value for k, _ in pairs if k.tag == _STR_TAG and type(k) is yaml.ScalarNode]
        if len(keys) == len(pairs) and len(set(keys)) == len(keys):
            return self._plain_mapping(pairs)
        return self._any_mapping(node)

    def _plain_mapping(self, pairs: list) -> dict:
        """The common mapping: unique plain string keys, nothing to report about them (no merge key)."""
        out: dict = {}
        path = self.path
        inline = 0
        for k_node, v_node in pairs:
            key = k_node.value
            if v_node.tag == _STR_TAG and type(v_node) is yaml.ScalarNode:
                inline += 1
                out[key] = v_node.value
                continue
            path.append(key)
            out[key] = self.build(v_node)
            path.pop()
        self._count(inline)
        return out

    def _any_mapping(self, node: yaml.MappingNode) -> dict:
        """Any mapping: reports duplicate and unusable keys, flattens merge keys."""
        first: dict[Any, int] = {}
        special = False                       # a merge key '<<' or a value key '=' (flatten_mapping's work)
        for k_node, _ in node.value:          # duplicates among explicit keys (merge keys may override)
            if k_node.tag in _FLATTEN_TAGS:
                special = True
            if k_node.tag == "tag:yaml.org,2002:merge" or not isinstance(k_node, yaml.ScalarNode):
                continue
            key = self.key_of(k_node)
            if key is _MISSING:
                continue
            kline = k_node.start_mark.line + 1
            if key in first:
                self._issue(f"duplicate key {key!r} (first at line {first[key]}); keep only one", key, line=kline)
            else:
                first[key] = kline
        if special:
            try:
                self.ctor.flatten_mapping(node)
            except yaml.YAMLError as e:
                self._issue(f"bad YAML merge: {getattr(e, 'problem', e)}")
        out: dict = {}
        path = self.path
        for k_node, v_node in node.value:
            if not isinstance(k_node, yaml.ScalarNode):
                self._issue("mapping keys must be plain strings", line=k_node.start_mark.line + 1)
                continue
            key = self.key_of(k_node)
            if key is _MISSING:
                self._issue(f"cannot read key {k_node.value!r}", line=k_node.start_mark.line + 1)
                continue
            if not isinstance(key, str):      # e.g. a profile named 1: names are strings
                self._issue(f"key {key!r} is a {type(key).__name__}; names must be strings (quote it: "
                            f"\"{k_node.value}\")", line=k_node.start_mark.line + 1)
                continue
            path.append(key)
            out[key] = self.build(v_node)
            path.pop()
        return out


class _TooBig(Exception):
    pass


def load_yaml(text: str, issues: Issues) -> Any:
    """Compose `text` (libyaml when available) and build plain data; _MISSING if unusable.

    Cost: one libyaml pass plus one Python visit per node. Duplicate keys are reported.
    """
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = " ".join(x for x in (e.context, e.problem) if x)
        if mark and "\t" in (text.split("\n")[mark.line] if mark.line < text.count("\n") + 1 else ""):
            what += " (tabs are not allowed for indentation; use spaces)"
        issues.add((), f"YAML syntax error: {what}; fix the YAML syntax",
                   line=mark.line + 1 if mark else None, use_index=False)
        return _MISSING
    except yaml.YAMLError as e:
        issues.add((), f"YAML error: {e}", use_index=False)
        return _MISSING
    if node is None:
        issues.add((), "policy is empty; start with 'version: 1' and 'name: ...'", line=1, use_index=False)
        return _MISSING
    tree = _Tree(issues)
    issues.index = LineIndex(node, tree.key_of)
    try:
        return tree.build(node)
    except _TooBig:
        issues.add((), f"document expands to more than {_MAX_NODES} YAML nodes (alias bomb?)")
    except RecursionError:
        issues.add((), "document is nested too deeply")
    return _MISSING
