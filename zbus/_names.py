"""Names on the wire: exchanges, routing keys, topic patterns and the topic frame.

Invariants a maintainer must keep (docs/PROTOCOL.md states them for other languages):

* An exchange name is 1..64 characters of ``[A-Za-z0-9_-]``.
* A routing key is 1..255 bytes of words joined by ``.``; a word is 1+ characters of
  ``[A-Za-z0-9_-]``. So a routing key never holds ``/``, ``*``, ``#``, NUL or spaces.
* The topic frame is ``exchange "/" routing_key`` in ASCII. Because ``/`` cannot occur in
  either part, the frame splits unambiguously at its only ``/``.
* Frames whose topic starts with NUL are zbus control traffic (readiness probes), never user
  messages, and can never collide with a valid topic.
* A pattern subscribes ZeroMQ on its longest literal prefix; the receiver then matches the
  routing key exactly. The prefix never excludes a topic the pattern matches.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Generic, TypeVar

from ._errors import InvalidName

__all__ = [
    "CONTROL_PREFIX",
    "TopicMatcher",
    "TopicPattern",
    "match_words",
    "split_topic",
    "topic_frame",
    "validate_exchange",
    "validate_name",
    "validate_routing_key",
]

CONTROL_PREFIX = b"\x00"

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_WORD = r"[A-Za-z0-9_-]+"
_ROUTING_KEY = re.compile(rf"{_WORD}(?:\.{_WORD})*\Z")
_PATTERN_WORD = re.compile(rf"(?:{_WORD}|\*|#)\Z")
MAX_ROUTING_KEY = 255

T = TypeVar("T")


def validate_name(name: str, what: str = "name") -> str:
    """Check an exchange, pool or key id name; return it unchanged."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidName(
            f"invalid {what} {name!r}: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'"
        )
    return name


def validate_exchange(name: str) -> str:
    return validate_name(name, "exchange name")


def is_routing_key(key: str) -> bool:
    """Whether ``key`` is a valid routing key or message type (never raises)."""
    return len(key) <= MAX_ROUTING_KEY and _ROUTING_KEY.match(key) is not None


def validate_routing_key(key: str) -> str:
    if not isinstance(key, str) or not is_routing_key(key):
        raise InvalidName(
            f"invalid routing key {key!r}: use words of A-Z, a-z, 0-9, '_' and '-' joined by "
            f"single dots, at most {MAX_ROUTING_KEY} characters "
            "(e.g. 'compute.instance.create.end')"
        )
    return key


# The name checks below are not cached: a per-key cache is fast only while the keys seen fit
# in it (issue 13, item 7). One regex over the whole topic costs about what a cache miss's
# bookkeeping did, at any number of distinct keys.
_TOPIC_TEXT = re.compile(rf"[A-Za-z0-9_-]{{1,64}}/{_WORD}(?:\.{_WORD})*\Z")
_TOPIC_FRAME = re.compile(_TOPIC_TEXT.pattern.encode("ascii"))


def topic_frame(exchange: str, routing_key: str) -> bytes:
    """The topic frame for ``exchange`` and ``routing_key``, validating both."""
    if type(exchange) is str and type(routing_key) is str and len(routing_key) <= MAX_ROUTING_KEY:
        text = f"{exchange}/{routing_key}"
        if _TOPIC_TEXT.match(text) is not None:
            return text.encode("ascii")
    validate_exchange(exchange)  # raises the error that says what is wrong
    validate_routing_key(routing_key)
    return f"{exchange}/{routing_key}".encode("ascii")  # a str subclass: valid after all


def split_topic(frame: bytes) -> tuple[str, str]:
    """Split a received topic frame into (exchange, routing key), validating both.

    Raises :class:`InvalidName` for anything a conforming publisher cannot have sent.
    """
    if _TOPIC_FRAME.match(frame) is not None:
        exchange, _, key = frame.decode("ascii").partition("/")
        if len(key) <= MAX_ROUTING_KEY:
            return exchange, key
    # Refused: find out why, for the error message.
    try:
        text = frame.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidName("topic frame is not ASCII") from None
    exchange, sep, key = text.partition("/")
    if not sep:
        raise InvalidName("topic frame has no '/' between exchange and routing key")
    return validate_exchange(exchange), validate_routing_key(key)


def match_words(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` is zero or more words."""
    # Iterative matcher with backtracking to the last '#', linear in practice and free of
    # recursion-depth limits (patterns are short, but keys come from the network).
    p = w = 0
    star_p = -1
    star_w = 0
    while w < len(words):
        if p < len(pattern) and pattern[p] == "#":
            star_p, star_w = p, w
            p += 1
        elif p < len(pattern) and (pattern[p] == "*" or pattern[p] == words[w]):
            p += 1
            w += 1
        elif star_p >= 0:
            star_w += 1
            w = star_w
            p = star_p + 1
        else:
            return False
    while p < len(pattern) and pattern[p] == "#":
        p += 1
    return p == len(pattern)


class _Node:
    """A node of the pattern trie: the words of the bound patterns, shared by prefix."""

    __slots__ = ("ends", "hash", "is_hash", "literal", "star")

    def __init__(self, is_hash: bool = False) -> None:
        self.literal: dict[str, _Node] = {}
        self.star: _Node | None = None
        self.hash: _Node | None = None
        self.is_hash = is_hash  # reached through '#': absorbs any further word
        self.ends: list[int] = []  # indexes of the bindings whose pattern ends here


class _State(Generic[T]):
    """A set of trie nodes the key so far can be at (one state of the lazily built DFA)."""

    __slots__ = ("edges", "nodes", "other", "values")

    def __init__(self, nodes: frozenset[_Node], values: tuple[T, ...]) -> None:
        self.nodes = nodes
        self.values = values  # what a key ending in this state matches, in binding order
        # Filled by TopicMatcher._expand on first visit: ``edges`` for the literal words some
        # node here can take, ``other`` for every other word (``self`` until then). ``other``
        # is set first, so a thread that sees ``edges`` also sees ``other``.
        self.other: _State[T] = self
        self.edges: dict[str, _State[T]] | None = None


def _closure(nodes: Iterable[_Node]) -> frozenset[_Node]:
    """``nodes`` plus every node reachable through '#' matching zero words."""
    out: set[_Node] = set()
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if node not in out:
            out.add(node)
            if node.hash is not None:
                todo.append(node.hash)
    return frozenset(out)


class TopicMatcher(Generic[T]):
    """Which of many bound (pattern, value) pairs match a routing key, AMQP rules.

    The patterns are compiled into a trie over words, and the trie into a DFA built lazily.
    A word no pattern names literally (an instance id, a host name) behaves like every other
    such word, so a state has one edge per literal word it can take plus one ``other`` edge:
    the DFA's size depends on the patterns only, never on the keys seen. Routing a key costs
    one dict lookup per word, whatever the number of distinct keys: there is no per-key cache
    to fill, evict or clear (issue 13, item 7: a cleared per-key cache made a message cost
    milliseconds past 4,096 distinct keys).

    ``max_states`` bounds memory against pattern sets whose DFA is exponential (``#.a.*.*.*``
    ...): reaching it drops the built states and starts again from the trie; a sane pattern
    set needs a few states per pattern word. (A ``max_states`` smaller than the exchanges
    plus one state's literal words is exceeded by that much.)
    """

    def __init__(
        self, bindings: Iterable[tuple[TopicPattern, T]] = (), *, max_states: int = 4096
    ) -> None:
        self._values: list[T] = []
        self._tries: dict[str, _Node] = {}
        for pattern, value in bindings:
            node = self._tries.setdefault(pattern.exchange, _Node())
            for word in pattern.words:
                if word == "#":
                    if node.hash is None:
                        node.hash = _Node(is_hash=True)
                    node = node.hash
                elif word == "*":
                    if node.star is None:
                        node.star = _Node()
                    node = node.star
                else:
                    node = node.literal.setdefault(word, _Node())
            node.ends.append(len(self._values))
            self._values.append(value)
        self.max_states = max_states
        self._states: dict[frozenset[_Node], _State[T]] = {}
        self._roots: dict[str, _State[T]] = {}
        self._reset()

    def _reset(self) -> None:
        self._states = {}
        self._roots = {ex: self._state(_closure((root,))) for ex, root in self._tries.items()}

    @property
    def state_count(self) -> int:
        """DFA states built so far (bounded by ``max_states``)."""
        return len(self._states)

    def _state(self, nodes: frozenset[_Node]) -> _State[T]:
        state = self._states.get(nodes)
        if state is None:
            ends = sorted(i for node in nodes for i in node.ends)
            state = _State(nodes, tuple(self._values[i] for i in ends))
            self._states[nodes] = state
        return state

    def _expand(self, state: _State[T]) -> dict[str, _State[T]]:
        words = {w for node in state.nodes for w in node.literal}
        if len(self._states) + 1 + len(words) > self.max_states:
            # Only pathological pattern sets get here. The state in hand stays valid (it is
            # its set of trie nodes); what hangs off it is rebuilt on demand.
            self._reset()
        absorbing = [node for node in state.nodes if node.is_hash]
        stars = [node.star for node in state.nodes if node.star is not None]
        state.other = self._state(_closure(absorbing + stars))
        edges: dict[str, _State[T]] = {}
        for word in words:
            steps = [node.literal[word] for node in state.nodes if word in node.literal]
            edges[word] = self._state(_closure(absorbing + stars + steps))
        state.edges = edges
        return edges

    def match(self, exchange: str, routing_key: str) -> tuple[T, ...]:
        """The values bound to patterns on ``exchange`` that match ``routing_key``."""
        state = self._roots.get(exchange)
        if state is None:
            return ()
        for word in routing_key.split("."):
            edges = state.edges
            if edges is None:
                edges = self._expand(state)
            state = edges.get(word, state.other)
        return state.values


class TopicPattern:
    """An exchange and an AMQP-style routing-key pattern, e.g. ``("notifications", "compute.#")``.

    ``prefix`` is what the ZeroMQ subscription uses; :meth:`matches` is the exact test.
    """

    __slots__ = ("exchange", "pattern", "prefix", "words")

    def __init__(self, exchange: str, pattern: str) -> None:
        self.exchange = validate_exchange(exchange)
        if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_ROUTING_KEY:
            raise InvalidName(f"invalid pattern {pattern!r}: it must be 1 to 255 characters")
        words = tuple(pattern.split("."))
        for word in words:
            if not _PATTERN_WORD.match(word):
                raise InvalidName(
                    f"invalid pattern {pattern!r}: each dot-separated word must be a literal "
                    "word of A-Z, a-z, 0-9, '_' and '-', or '*' (one word), or '#' (zero or "
                    "more words); empty words are not allowed"
                )
        self.pattern = pattern
        self.words = words
        self.prefix = self._literal_prefix()

    def _literal_prefix(self) -> bytes:
        literal: list[str] = []
        for word in self.words:
            if word in ("*", "#"):
                break
            literal.append(word)
        head = self.exchange + "/" + ".".join(literal)
        rest = self.words[len(literal) :]
        # 'a.*' can require the dot; 'a.#' cannot, because '#' also matches zero words ('a').
        if literal and rest and rest[0] == "*":
            head += "."
        return head.encode("ascii")

    def matches(self, exchange: str, routing_key: str) -> bool:
        """Whether this pattern matches; one at a time (:class:`TopicMatcher` routes many)."""
        return exchange == self.exchange and match_words(
            self.words, tuple(routing_key.split("."))
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TopicPattern)
            and other.exchange == self.exchange
            and other.pattern == self.pattern
        )

    def __hash__(self) -> int:
        return hash((self.exchange, self.pattern))

    def __repr__(self) -> str:
        return f"TopicPattern({self.exchange!r}, {self.pattern!r})"

    def __str__(self) -> str:
        return f"{self.exchange}/{self.pattern}"

    @classmethod
    def parse(cls, text: str) -> TopicPattern:
        """Parse ``"exchange/pattern"`` (the form the CLI and pool declarations use)."""
        exchange, sep, pattern = text.partition("/")
        if not sep:
            raise InvalidName(f"invalid binding {text!r}: write it as 'exchange/pattern'")
        return cls(exchange, pattern)


def minimal_prefixes(patterns: Iterable[TopicPattern]) -> list[bytes]:
    """The ZeroMQ subscriptions covering ``patterns``: prefixes covered by a shorter one go."""
    out: list[bytes] = []
    for prefix in sorted({p.prefix for p in patterns}):
        if not out or not prefix.startswith(out[-1]):
            out.append(prefix)
    return out
