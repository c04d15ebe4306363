"""Name grammar, topic frames, the AMQP pattern matcher and subscription prefixes."""

from __future__ import annotations

import gc
import re
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import zbus
from zbus._names import (
    TopicMatcher,
    TopicPattern,
    match_words,
    minimal_prefixes,
    split_topic,
    topic_frame,
    validate_exchange,
    validate_name,
    validate_routing_key,
)

# -- names ---------------------------------------------------------------------------------

GOOD_NAMES = ["a", "notifications", "A-b_9", "x" * 64, "-", "_"]
BAD_NAMES: list[Any] = [
    "", "x" * 65, "a.b", "a/b", "a b", "é", "a*", "a#", "\x00a", "a\n", " a", b"a", None, 1,
]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_exchange_and_pool_names(name: str) -> None:
    assert validate_exchange(name) == name
    assert validate_name(name, "pool name") == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_exchange_names_are_refused_clearly(name: Any) -> None:
    with pytest.raises(zbus.InvalidName) as info:
        validate_exchange(name)
    assert repr(name) in str(info.value)
    assert "exchange" in str(info.value)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_pool_names_are_refused(name: Any, tmp_path: Path) -> None:
    with pytest.raises(zbus.InvalidName, match="pool name"):
        validate_name(name, "pool name")
    if isinstance(name, str):
        with pytest.raises(zbus.InvalidName):
            zbus.Endpoints(tmp_path).pool(name)


def test_invalid_name_is_a_config_error_and_a_value_error() -> None:
    with pytest.raises(zbus.ConfigError):
        validate_exchange("a.b")
    with pytest.raises(ValueError):
        validate_exchange("a.b")
    assert issubclass(zbus.InvalidName, zbus.ZbusError)


@pytest.mark.parametrize("name", ["bad id", "", "k" * 65, "ké"])
def test_bad_key_ids_are_refused(name: str) -> None:
    with pytest.raises(zbus.InvalidName, match="key id"):
        zbus.KeyRing({name: bytes(32)})


GOOD_KEYS = ["a", "a.b", "compute.instance.create.end", "a-b_c.D9", "x" * 255, ".".join("a" * 128)]
BAD_KEYS: list[Any] = [
    "", ".", "a.", ".a", "a..b", "a/b", "a b", "a.*", "a.#", "*", "#", "é", "a\n", "a.b\n",
    "x" * 256, "\x00probe", b"a", None,
]


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_good_routing_keys(key: str) -> None:
    assert validate_routing_key(key) == key


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_routing_keys_are_refused_clearly(key: Any) -> None:
    with pytest.raises(zbus.InvalidName, match="routing key"):
        validate_routing_key(key)


def test_message_class_with_bad_type_is_refused_at_definition() -> None:
    with pytest.raises(zbus.InvalidName):

        class Bad(zbus.Message):
            message_type = "compute..end"


# -- topic frames --------------------------------------------------------------------------


def test_topic_frame_and_split_round_trip() -> None:
    frame = topic_frame("notifications", "compute.instance.create.end")
    assert frame == b"notifications/compute.instance.create.end"
    assert split_topic(frame) == ("notifications", "compute.instance.create.end")


@pytest.mark.parametrize(("exchange", "key"), [("a.b", "k"), ("a", "b/c"), ("", "k"), ("a", "")])
def test_topic_frame_validates_both_parts(exchange: str, key: str) -> None:
    with pytest.raises(zbus.InvalidName):
        topic_frame(exchange, key)


@pytest.mark.parametrize(
    "frame",
    [b"noslash", b"a/b/c", b"/k", b"a/", b"a/b..c", b"\xff/k", b"a/\xc3\xa9", b"\x00probe/ab",
     b"a b/k", b""],
)
def test_split_topic_refuses_what_no_publisher_can_send(frame: bytes) -> None:
    with pytest.raises(zbus.InvalidName):
        split_topic(frame)


@given(
    st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9_-]{1,8}(\.[A-Za-z0-9_-]{1,8}){0,6}", fullmatch=True),
)
def test_topic_frame_round_trip_property(exchange: str, key: str) -> None:
    assert split_topic(topic_frame(exchange, key)) == (exchange, key)


# -- the matcher ---------------------------------------------------------------------------

# (pattern, routing key, expected) — written from the AMQP rules, not from the code.
MATCH_TABLE = [
    ("a", "a", True),
    ("a", "b", False),
    ("a.b", "a.b", True),
    ("a.b", "a.bc", False),
    ("a.b", "a", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.*", "a.b", True),
    ("a.*", "a", False),
    ("a.*", "a.b.c", False),  # kombu once matched this
    ("*.b", "a.b", True),
    ("*.b", "b", False),
    ("*.*", "a.b", True),
    ("*.*", "a", False),
    ("*.*", "a.b.c", False),
    ("#", "a", True),
    ("#", "a.b.c.d", True),
    ("a.#", "a", True),
    ("a.#", "a.b", True),
    ("a.#", "a.b.c", True),
    ("a.#", "b", False),
    ("a.#", "ab", False),
    ("a.#", "b.a", False),
    ("#.a", "a", True),
    ("#.a", "x.a", True),
    ("#.a", "x.y.a", True),
    ("#.a", "a.x", False),
    ("#.a", "ba", False),
    ("a.*.#", "a", False),
    ("a.*.#", "a.b", True),
    ("a.*.#", "a.b.c.d", True),
    ("a.*.#", "b.c", False),
    ("#.#", "a", True),
    ("#.#", "a.b.c", True),
    ("a.#.#.b", "a.b", True),
    ("a.#.b.#.c", "a.b.c", True),
    ("a.#.b.#.c", "a.x.b.y.z.c", True),
    ("a.#.b.#.c", "a.c", False),
    ("a.#.b.#.c", "a.b.c.d", False),
    ("#.b.#", "b", True),
    ("#.b.#", "a.b.c", True),
    ("#.b.#", "a.c", False),
    ("#.*", "a", True),
    ("#.*", "a.b.c", True),
    ("#.*.*", "a", False),
    ("*.#.*", "a.b", True),
    ("*.#.*", "a", False),
    ("*.#.*", "a.b.c.d", True),
    ("#.a.#.a", "a.a", True),
    ("#.a.#.a", "a.b.a.b", False),
    ("compute.instance.*.end", "compute.instance.create.end", True),
    ("compute.instance.*.end", "compute.instance.create.start", False),
]


@pytest.mark.parametrize(("pattern", "key", "expected"), MATCH_TABLE)
def test_matcher_table(pattern: str, key: str, expected: bool) -> None:
    p = TopicPattern("ex", pattern)
    assert p.matches("ex", key) is expected
    assert p.matches("ex", key) is expected  # second time through the cache
    assert p.matches("other", key) is False
    if expected:
        assert topic_frame("ex", key).startswith(p.prefix)


BAD_PATTERNS: list[Any] = [
    "", ".", "a..b", ".a", "a.", "a.*b", "a#", "**", "##", "a.b c", "a/b", "é", "x" * 256,
    "a.#\n", None, b"a",
]


@pytest.mark.parametrize("pattern", BAD_PATTERNS)
def test_bad_patterns_are_refused(pattern: Any) -> None:
    with pytest.raises(zbus.InvalidName, match="pattern"):
        TopicPattern("ex", pattern)


@pytest.mark.parametrize("exchange", ["a.b", "*", "#", ""])
def test_pattern_exchange_must_be_a_name(exchange: str) -> None:
    with pytest.raises(zbus.InvalidName):
        TopicPattern(exchange, "#")


def test_pattern_parse_and_identity() -> None:
    p = TopicPattern.parse("notifications/compute.#")
    assert (p.exchange, p.pattern) == ("notifications", "compute.#")
    assert str(p) == "notifications/compute.#"
    assert p == TopicPattern("notifications", "compute.#")
    assert len({p, TopicPattern("notifications", "compute.#")}) == 1
    assert p != TopicPattern("notifications", "compute.*")
    with pytest.raises(zbus.InvalidName, match="exchange/pattern"):
        TopicPattern.parse("compute.#")
    with pytest.raises(zbus.InvalidName):
        TopicPattern.parse("a/b/c")


def retained_bytes(work: Callable[[int], object], n: int) -> int:
    """Bytes still allocated after ``work(i)`` ran for n distinct i (results dropped)."""
    work(-1)  # first-call allocations (regex internals, DFA states) are not per-key memory
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            work(i)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_name_checks_keep_nothing_per_key() -> None:
    # Issue 13, item 7: per-key caches made a message cost ~10x more once the distinct keys
    # outgrew them. 20,000 distinct keys through every name check leave nothing behind (the
    # old 4,096-entry caches kept about a megabyte).
    def work(i: int) -> object:
        key = f"compute.instance.i{i}.end"
        frame = topic_frame("notifications", key)
        assert split_topic(frame) == ("notifications", key)
        return validate_routing_key(key)

    assert retained_bytes(work, 20_000) < 32_768


def test_pattern_matching_keeps_nothing_per_key() -> None:
    p = TopicPattern("ex", "a.#")
    assert retained_bytes(lambda i: p.matches("ex", f"a.k{i}"), 20_000) < 32_768
    assert p.matches("ex", "a.k1") and not p.matches("ex", "b.k1")


# -- reference implementation --------------------------------------------------------------


def reference_match(pattern: str, key: str) -> bool:
    """AMQP matching by regex translation over '.'-prefixed words: independent of zbus."""
    parts = []
    for word in pattern.split("."):
        if word == "#":
            parts.append(r"(?:\.[^.]+)*")
        elif word == "*":
            parts.append(r"\.[^.]+")
        else:
            parts.append(r"\." + re.escape(word))
    return re.fullmatch("".join(parts), "." + key) is not None


# Few distinct words, so that literal words collide with key words often.
key_words = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=7)
pattern_words = st.lists(st.sampled_from(["a", "b", "c", "*", "#"]), min_size=1, max_size=6)


def test_reference_agrees_with_the_table() -> None:
    for pattern, key, expected in MATCH_TABLE:
        assert reference_match(pattern, key) is expected, (pattern, key)


@given(pattern_words, key_words)
def test_matcher_agrees_with_reference(pw: list[str], kw: list[str]) -> None:
    pattern, key = ".".join(pw), ".".join(kw)
    assert match_words(tuple(pw), tuple(kw)) is reference_match(pattern, key)
    assert TopicPattern("ex", pattern).matches("ex", key) is reference_match(pattern, key)


@given(pattern_words, st.lists(st.sampled_from(["a", "b", "ab", "a-b", "c"]), min_size=1,
                               max_size=7))
def test_prefix_never_excludes_a_matching_key(pw: list[str], kw: list[str]) -> None:
    pattern = TopicPattern("ex", ".".join(pw))
    key = ".".join(kw)
    if pattern.matches("ex", key):
        assert topic_frame("ex", key).startswith(pattern.prefix)
    # Another exchange never passes the prefix filter, whatever the key.
    assert not topic_frame("ex2", key).startswith(pattern.prefix)


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("compute.instance.*.end", b"ex/compute.instance."),
        ("compute.#", b"ex/compute"),
        ("#", b"ex/"),
        ("*.end", b"ex/"),
        ("a.b", b"ex/a.b"),
        ("a.#.*", b"ex/a"),
    ],
)
def test_prefix_is_the_literal_head(pattern: str, prefix: bytes) -> None:
    assert TopicPattern("ex", pattern).prefix == prefix


@given(st.lists(pattern_words, min_size=1, max_size=6))
def test_minimal_prefixes_cover_every_pattern_without_redundancy(pws: list[list[str]]) -> None:
    patterns = [TopicPattern("ex", ".".join(pw)) for pw in pws]
    prefixes = minimal_prefixes(patterns)
    for p in patterns:
        assert any(p.prefix.startswith(q) for q in prefixes)
    for q in prefixes:
        assert not any(q != r and q.startswith(r) for r in prefixes)


# -- many patterns at once: the compiled matcher -------------------------------------------


@pytest.mark.parametrize(("pattern", "key", "expected"), MATCH_TABLE)
def test_compiled_matcher_table(pattern: str, key: str, expected: bool) -> None:
    m = TopicMatcher([(TopicPattern("ex", pattern), "v")])
    assert m.match("ex", key) == (("v",) if expected else ())
    assert m.match("ex", key) == (("v",) if expected else ())  # through built states
    assert m.match("other", key) == ()


def test_compiled_matcher_with_the_whole_table_bound_at_once() -> None:
    patterns = sorted({p for p, _, _ in MATCH_TABLE})
    m = TopicMatcher([(TopicPattern("ex", p), i) for i, p in enumerate(patterns)])
    for key in sorted({k for _, k, _ in MATCH_TABLE}):
        expected = tuple(i for i, p in enumerate(patterns) if reference_match(p, key))
        assert m.match("ex", key) == expected, key


# Words no pattern names ("x", "zz") stand for instance ids and host names in real keys.
many_key_words = st.lists(st.sampled_from(["a", "b", "c", "x", "zz"]), min_size=1, max_size=9)
bound = st.lists(st.tuples(st.sampled_from(["ex", "ex2"]), pattern_words), min_size=1,
                 max_size=8)


@given(bound, st.lists(many_key_words, min_size=1, max_size=10),
       st.sampled_from([4096, 3, 8]))
def test_compiled_matcher_agrees_with_reference(
    binds: list[tuple[str, list[str]]], keys: list[list[str]], max_states: int
) -> None:
    # max_states 3 and 8 force the matcher to drop and rebuild its states mid-key.
    patterns = [TopicPattern(ex, ".".join(pw)) for ex, pw in binds]
    m = TopicMatcher([(p, i) for i, p in enumerate(patterns)], max_states=max_states)
    for kw in keys + keys:  # the second pass walks states built by the first
        key = ".".join(kw)
        for exchange in ("ex", "ex2", "ex3"):
            expected = tuple(
                i for i, p in enumerate(patterns)
                if p.exchange == exchange and reference_match(p.pattern, key)
            )
            assert m.match(exchange, key) == expected
    assert m.state_count <= max(max_states, 2 + 1 + 3)  # roots, other, one state's words


@given(pattern_words, st.lists(st.sampled_from(["a", "*", "#", "", "b-c"]), min_size=1,
                               max_size=6))
def test_compiled_matcher_agrees_with_match_words_on_odd_keys(
    pw: list[str], kw: list[str]
) -> None:
    # route() is public: keys a consumer would have refused still route as match_words says.
    m = TopicMatcher([(TopicPattern("ex", ".".join(pw)), 1)])
    assert m.match("ex", ".".join(kw)) == ((1,) if match_words(tuple(pw), tuple(kw)) else ())


def test_compiled_matcher_states_do_not_grow_with_keys() -> None:
    patterns = ["compute.#", "compute.instance.*.end", "network.#", "*.*.error", "#.audit"]
    m = TopicMatcher([(TopicPattern("ex", p), p) for p in patterns])
    for i in range(1_000):
        m.match("ex", f"compute.instance.i{i}.end")
        m.match("ex", f"network.port.p{i}.create")
        m.match("ex", f"h{i}.x.error")
    states = m.state_count
    assert states < 40  # a few per pattern word
    for i in range(200_000):
        m.match("ex", f"compute.instance.j{i}.end")
    assert m.state_count == states
    assert m.match("ex", "compute.instance.anything.end") == ("compute.#",
                                                               "compute.instance.*.end")


def test_compiled_matcher_memory_is_bounded_for_an_exponential_pattern() -> None:
    # '#' followed by n '*'s needs 2**n DFA states; the bound holds and answers stay right.
    pattern = TopicPattern("ex", "#.a.*.*.*.*.*.*.*.*")
    m = TopicMatcher([(pattern, 1)], max_states=64)
    keys = [".".join("ab"[(i >> b) & 1] for b in range(12)) for i in range(4096)]
    for key in keys:
        assert m.match("ex", key) == ((1,) if reference_match(pattern.pattern, key) else ())
        assert m.state_count <= 64


@given(st.binary(max_size=12).map(lambda b: b.replace(b"\x00", b"a"))
       | st.lists(st.sampled_from([b"a", b"-", b".", b"/", b"*", b" ", b"\xc3", b"\n"]),
                  max_size=10).map(b"".join))
def test_split_topic_accepts_exactly_the_valid_frames(frame: bytes) -> None:
    try:
        exchange, key = frame.decode("ascii").split("/")
        valid = validate_exchange(exchange) == exchange and validate_routing_key(key) == key
    except (UnicodeDecodeError, ValueError):
        valid = False
    if valid:
        assert split_topic(frame) == (exchange, key)
        assert topic_frame(exchange, key) == frame
    else:
        with pytest.raises(zbus.InvalidName):
            split_topic(frame)


def test_long_topics_at_the_length_limits() -> None:
    key = ".".join(["k"] * 128)  # 255 characters
    assert split_topic(topic_frame("x" * 64, key)) == ("x" * 64, key)
    for exchange, bad_key in (("x" * 65, "k"), ("x", key + "k")):
        with pytest.raises(zbus.InvalidName):
            topic_frame(exchange, bad_key)
        with pytest.raises(zbus.InvalidName):
            split_topic(f"{exchange}/{bad_key}".encode())


class _Name(str):
    pass


def test_topic_frame_refuses_non_strings_and_takes_str_subclasses() -> None:
    assert topic_frame(_Name("ex"), _Name("a.b")) == b"ex/a.b"
    for exchange, key in ((1, "a"), ("ex", 1), (b"ex", "a"), ("ex", b"a")):
        with pytest.raises(zbus.InvalidName):
            topic_frame(exchange, key)  # type: ignore[arg-type]
