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
from functools import lru_cache

from ._errors import InvalidName

__all__ = [
    "CONTROL_PREFIX",
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


def validate_name(name: str, what: str = "name") -> str:
    """Check an exchange, pool or key id name; return it unchanged."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidName(
            f"invalid {what} {name!r}: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'"
        )
    return name


def validate_exchange(name: str) -> str:
    return validate_name(name, "exchange name")


@lru_cache(maxsize=4096)
def is_routing_key(key: str) -> bool:
    """Whether ``key`` is a valid routing key or message type (cached; never raises)."""
    return len(key) <= MAX_ROUTING_KEY and _ROUTING_KEY.match(key) is not None


def validate_routing_key(key: str) -> str:
    if not isinstance(key, str) or not is_routing_key(key):
        raise InvalidName(
            f"invalid routing key {key!r}: use words of A-Z, a-z, 0-9, '_' and '-' joined by "
            f"single dots, at most {MAX_ROUTING_KEY} characters "
            "(e.g. 'compute.instance.create.end')"
        )
    return key


@lru_cache(maxsize=4096)
def topic_frame(exchange: str, routing_key: str) -> bytes:
    """The topic frame for ``exchange`` and ``routing_key``, validating both (cached)."""
    validate_exchange(exchange)
    validate_routing_key(routing_key)
    return f"{exchange}/{routing_key}".encode("ascii")


@lru_cache(maxsize=4096)  # bounded: consumers call it only on MAC-verified frames
def split_topic(frame: bytes) -> tuple[str, str]:
    """Split a received topic frame into (exchange, routing key), validating both (cached).

    Raises :class:`InvalidName` for anything a conforming publisher cannot have sent.
    """
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


class TopicPattern:
    """An exchange and an AMQP-style routing-key pattern, e.g. ``("notifications", "compute.#")``.

    ``prefix`` is what the ZeroMQ subscription uses; :meth:`matches` is the exact test.
    """

    __slots__ = ("_cache", "exchange", "pattern", "prefix", "words")

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
        self._cache: dict[str, bool] = {}

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
        if exchange != self.exchange:
            return False
        hit = self._cache.get(routing_key)
        if hit is None:
            hit = match_words(self.words, tuple(routing_key.split(".")))
            if len(self._cache) >= 4096:  # keys come from the network: keep memory bounded
                self._cache.clear()
            self._cache[routing_key] = hit
        return hit

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
