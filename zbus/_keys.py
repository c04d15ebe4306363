"""Signing keys: a ring of keys by id, one of them active for signing.

Invariants a maintainer must keep:

* Key material never appears in ``repr``, ``str``, error messages or log lines.
* A ring is immutable: rotation makes a new ring (``with_active``, ``without``), so a ring
  handed to a consumer or factory never changes under it.
* Per-exchange keys: ``exchanges`` maps an exchange to the key ids allowed on it, the first
  of which signs there. On such a *restricted* exchange only those ids verify. On every other
  exchange only the *shared* ids verify: by default the active key plus every key named in no
  ``exchanges`` entry. So a key given to one exchange's publishers cannot sign for another
  exchange, and the ring-wide key cannot sign for a restricted one unless it is listed there.
  ``permits``/``check_exchange`` answer this in one set lookup (the consumer's hot path).
* Publisher bindings: ``publishers`` maps a key id to the publisher ids it may sign for
  (exact ids, or prefixes ending in ``*``). A key named there verifies only messages whose
  envelope claims a matching ``publisher_id``; a key not named is unbound (may claim any id).
  Each bound key has a precomputed matcher (exact set, prefix tuple for ``str.startswith``)
  in ``_bound``; a key bound to ``*`` alone has none. The consumer tests ``_bound`` for
  emptiness before anything else, so an unbound ring pays one truth test per message.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Collection, Mapping

from ._errors import ConfigError, KeyNotAllowedError, PublisherNotAllowedError, UnknownKeyError
from ._names import validate_exchange, validate_name

__all__ = [
    "KeyNotAllowedError",
    "KeyRing",
    "MIN_KEY_BYTES",
    "PublisherNotAllowedError",
    "format_key_file",
    "generate_key",
]

MIN_KEY_BYTES = 16
DEFAULT_KEY_ID = "default"


def generate_key() -> bytes:
    """A fresh 32-byte random signing key."""
    return os.urandom(32)


def format_key_file(key: bytes, key_id: str = DEFAULT_KEY_ID) -> str:
    """The text of a key file holding ``key`` under ``key_id`` (see KeyRing.from_file)."""
    _check_key(validate_name(key_id, "key id"), key)
    return f"# zbus signing key: keep this file private (mode 0600)\n{key_id} {key.hex()}\n"


def _check_key(key_id: str, key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)):
        raise ConfigError(f"key {key_id!r} must be bytes, not {type(key).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"key {key_id!r} is {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes "
            "(zbus.generate_key() makes one)"
        )
    return bytes(key)


def _publisher_patterns(key_id: str, patterns: object) -> tuple[str, ...]:
    listed = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(listed, Collection):
        raise ConfigError(
            f"publishers[{key_id!r}] must be a pattern or a list of patterns, not "
            f"{type(patterns).__name__}"
        )
    if not listed:
        raise ConfigError(
            f"publishers[{key_id!r}] lists no pattern: bind the key to at least one publisher "
            "id, or leave it out of publishers= to leave it unbound"
        )
    for pattern in listed:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(
                f"publishers[{key_id!r}] holds {pattern!r}: a pattern is a publisher id such "
                "as 'compute.host1', or a prefix ending in '*' such as 'compute.*'"
            )
        if "*" in pattern[:-1]:
            raise ConfigError(
                f"publishers[{key_id!r}] pattern {pattern!r} has a '*' before its end: '*' "
                "may only end a pattern (a prefix, as in 'compute.*'); list several patterns "
                "instead"
            )
    return tuple(dict.fromkeys(listed))  # in order, without repeats


class KeyRing:
    """Keys by id. ``active`` signs; every key in the ring verifies.

    Rotation without downtime: add the new key to every consumer's ring, then make it active
    on the publishers, then remove the old one.
    """

    __slots__ = (
        "_active", "_active_key", "_allowed", "_bound", "_keys", "_publishers", "_shared",
        "_signers",
    )

    def __init__(
        self,
        keys: Mapping[str, bytes],
        active: str | None = None,
        *,
        exchanges: Mapping[str, str | Collection[str]] | None = None,
        shared: Collection[str] | None = None,
        publishers: Mapping[str, str | Collection[str]] | None = None,
    ) -> None:
        """``keys`` by id; ``active`` signs on exchanges not in ``exchanges``.

        ``exchanges`` (optional) maps an exchange name to the key id, or the ids in order of
        preference, allowed on it: the first signs there, all of them verify there, and no
        other key verifies there. ``shared`` (optional) lists the ids that verify on every
        exchange *not* in ``exchanges``; by default the active key and every key that no
        ``exchanges`` entry names.

        ``publishers`` (optional) binds key ids to the publisher ids they may sign for: a
        pattern, or a list of them, per key id. A pattern is an exact publisher id
        (``"compute.host1"``) or a prefix ending in ``*`` (``"compute.*"`` matches
        ``"compute.host1"`` and ``"compute.a.b"``: unlike in topic patterns, ``*`` here
        matches any rest, dots included; ``"*"`` alone matches every id). A bound key's
        messages that claim another publisher id are rejected (``publisher_not_allowed``),
        and a :class:`MessageFactory` refuses to sign with it for another id. Keys not named
        are unbound and may claim any publisher id.
        """
        if not keys:
            raise ConfigError("a KeyRing needs at least one key")
        self._keys = {validate_name(k, "key id"): _check_key(k, v) for k, v in keys.items()}
        if active is None:
            if len(self._keys) != 1:
                raise ConfigError("this KeyRing holds several keys: say which is active=")
            active = next(iter(self._keys))
        if active not in self._keys:
            raise ConfigError(f"active key id {active!r} is not in the ring {sorted(self._keys)}")
        self._active = active
        self._active_key = self._keys[active]
        self._allowed: dict[str, frozenset[str]] = {}
        self._signers: dict[str, str] = {}
        for exchange, ids in (exchanges or {}).items():
            validate_exchange(exchange)
            listed = [ids] if isinstance(ids, str) else list(ids)
            if not listed:
                raise ConfigError(f"exchange {exchange!r} lists no key id")
            self._require(listed, f"exchange {exchange!r}")
            self._signers[exchange] = listed[0]
            self._allowed[exchange] = frozenset(listed)
        if shared is None:
            named = set().union(*self._allowed.values()) if self._allowed else set()
            self._shared = frozenset({active} | (set(self._keys) - named))
        else:
            listed = [shared] if isinstance(shared, str) else list(shared)
            self._shared = frozenset(self._require(listed, "shared"))
        self._publishers: dict[str, tuple[str, ...]] = {}
        # key id -> (exact ids, prefixes): the consumer's per-message check, precomputed.
        self._bound: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {}
        if publishers is not None and not isinstance(publishers, Mapping):
            raise ConfigError(
                "publishers must map key ids to publisher id patterns, e.g. "
                "{'k-compute': 'compute.*'}"
            )
        for key_id, patterns in (publishers or {}).items():
            self._require([key_id], "publishers")
            valid = self._publishers[key_id] = _publisher_patterns(key_id, patterns)
            prefixes = tuple(p[:-1] for p in valid if p.endswith("*"))
            if "" not in prefixes:  # "*" alone: any publisher id, so nothing to check
                exact = frozenset(p for p in valid if not p.endswith("*"))
                self._bound[key_id] = (exact, prefixes)

    def _require(self, ids: list[str], where: str) -> list[str]:
        for key_id in ids:
            if not isinstance(key_id, str) or key_id not in self._keys:
                raise ConfigError(
                    f"{where} names key id {key_id!r}, which is not in the ring "
                    f"{sorted(self._keys)}"
                )
        return ids

    @classmethod
    def of(cls, key: bytes | KeyRing, key_id: str = DEFAULT_KEY_ID) -> KeyRing:
        """A ring from a ring (returned as is) or from one key (under ``key_id``)."""
        if isinstance(key, KeyRing):
            return key
        return cls({key_id: key})

    @property
    def active_id(self) -> str:
        return self._active

    @property
    def active_key(self) -> bytes:
        return self._active_key

    @property
    def exchanges(self) -> dict[str, list[str]]:
        """The restricted exchanges and their allowed key ids (the signing one first)."""
        return {
            exchange: [signer, *sorted(self._allowed[exchange] - {signer})]
            for exchange, signer in self._signers.items()
        }

    @property
    def shared_ids(self) -> list[str]:
        """The key ids that verify on every exchange not in :attr:`exchanges`."""
        return sorted(self._shared)

    def signing_key_for(self, exchange: str) -> tuple[str, bytes]:
        """(key id, key) that signs messages on ``exchange``."""
        key_id = self._signers.get(exchange, self._active)
        return key_id, self._keys[key_id]

    def permits(self, exchange: str, key_id: str) -> bool:
        """Whether a message on ``exchange`` may be signed by ``key_id`` (one set lookup)."""
        return key_id in self._allowed.get(exchange, self._shared)

    def check_exchange(self, exchange: str, key_id: str) -> None:
        """Raise :class:`KeyNotAllowedError` unless ``key_id`` may sign on ``exchange``."""
        if key_id not in self._allowed.get(exchange, self._shared):
            allowed = sorted(self._allowed.get(exchange, self._shared))
            raise KeyNotAllowedError(
                f"key id {key_id!r} is not allowed on exchange {exchange!r} "
                f"(allowed there: {allowed})"
            )

    @property
    def publishers(self) -> dict[str, list[str]]:
        """The bound key ids and the publisher id patterns each may sign for."""
        return {key_id: list(patterns) for key_id, patterns in self._publishers.items()}

    def permits_publisher(self, publisher_id: str, key_id: str) -> bool:
        """Whether ``key_id`` may sign for ``publisher_id`` (always, if the key is unbound)."""
        bound = self._bound.get(key_id)
        return bound is None or publisher_id.startswith(bound[1]) or publisher_id in bound[0]

    def check_publisher(self, publisher_id: str, key_id: str) -> None:
        """Raise :class:`PublisherNotAllowedError` unless ``key_id`` may sign for
        ``publisher_id``."""
        bound = self._bound.get(key_id)
        # Prefixes first: the usual binding is a prefix, and startswith needs no hash.
        if bound is None or publisher_id.startswith(bound[1]) or publisher_id in bound[0]:
            return
        raise PublisherNotAllowedError(
            f"key id {key_id!r} signed a message claiming publisher id {publisher_id!r}, but "
            f"it may sign only for {list(self._publishers[key_id])}"
        )

    def with_active(self, key_id: str) -> KeyRing:
        """The same ring with ``key_id`` as the active (signing) key: step 2 of a rotation.

        Per-exchange entries and publisher bindings are kept; the old active key stays
        shared only if an explicit ``shared`` list named it or no ``exchanges`` entry names it.
        """
        return KeyRing(
            self._keys, key_id, exchanges=self.exchanges,
            shared=self._explicit_shared(lambda ids: ids | {key_id}),
            publishers=self.publishers,
        )

    def without(self, key_id: str) -> KeyRing:
        """The same ring with ``key_id`` removed: retiring a key, step 3 of a rotation.

        Its publisher binding goes with it; the others are kept."""
        if key_id not in self._keys:
            raise ConfigError(f"no key with id {key_id!r} in this key ring")
        if key_id == self._active:
            raise ConfigError(f"key id {key_id!r} is the active key: make another active first")
        exchanges: dict[str, list[str]] = {}
        for exchange, ids in self.exchanges.items():
            kept = [i for i in ids if i != key_id]
            if not kept:
                raise ConfigError(
                    f"key id {key_id!r} is the only key of exchange {exchange!r}: give the "
                    "exchange another key first"
                )
            exchanges[exchange] = kept
        keys = {k: v for k, v in self._keys.items() if k != key_id}
        publishers = {k: v for k, v in self.publishers.items() if k != key_id}
        return KeyRing(keys, self._active, exchanges=exchanges,
                       shared=self._explicit_shared(lambda ids: ids - {key_id}),
                       publishers=publishers)

    def _explicit_shared(
        self, change: Callable[[frozenset[str]], frozenset[str]]
    ) -> frozenset[str] | None:
        # Keep an explicit shared set explicit (changed as asked); a default one stays default.
        named = set().union(*self._allowed.values()) if self._allowed else set()
        default = frozenset({self._active} | (set(self._keys) - named))
        return None if self._shared == default else change(self._shared)

    def get(self, key_id: str) -> bytes:
        try:
            return self._keys[key_id]
        except KeyError:
            raise UnknownKeyError(
                f"no key with id {key_id!r} in this key ring (it holds {sorted(self._keys)})"
            ) from None

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        exchanges: Mapping[str, str | Collection[str]] | None = None,
        shared: Collection[str] | None = None,
        publishers: Mapping[str, str | Collection[str]] | None = None,
    ) -> KeyRing:
        """Read a key file (as ``zbus keygen`` writes it) into a ring.

        Lines are ``KEY_ID HEX`` or just ``HEX`` (key id ``default``); ``#`` starts a
        comment. The first key is the active (signing) one; all of them verify, subject to
        ``exchanges``, ``shared`` and ``publishers`` (as in the constructor: policy is given
        here, the file holds only keys). A file that others can read or write, or that its
        group can write, is refused.
        """
        where = str(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                # Checked on the opened file, so a swap after the check changes nothing.
                _check_key_file(where, os.fstat(f.fileno()))
                text = f.read(_MAX_KEY_FILE + 1).decode("ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read key file {where!r}: {exc}") from None
        if len(text) > _MAX_KEY_FILE:
            raise ConfigError(f"key file {where!r} is over {_MAX_KEY_FILE} bytes: not a key file")
        keys: dict[str, bytes] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            parts = raw.split("#", 1)[0].split()
            if not parts:
                continue
            if len(parts) > 2:
                raise ConfigError(f"{where}:{number}: expected 'KEY_ID HEX' or 'HEX'")
            key_id, hexkey = (DEFAULT_KEY_ID, parts[0]) if len(parts) == 1 else parts
            if key_id in keys:
                raise ConfigError(f"{where}:{number}: key id {key_id!r} appears twice")
            try:
                keys[key_id] = bytes.fromhex(hexkey)
            except ValueError:
                raise ConfigError(f"{where}:{number}: the key is not hexadecimal") from None
        if not keys:
            raise ConfigError(f"key file {where!r} holds no key: make one with 'zbus keygen FILE'")
        return cls(keys, active=next(iter(keys)), exchanges=exchanges, shared=shared,
                   publishers=publishers)

    def ids(self) -> list[str]:
        return sorted(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __repr__(self) -> str:
        extra = f", exchanges={self.exchanges!r}" if self._signers else ""
        if self._publishers:
            extra += f", publishers={self.publishers!r}"
        return f"KeyRing(ids={self.ids()!r}, active={self._active!r}{extra})"


_MAX_KEY_FILE = 1 << 20


def _check_key_file(where: str, info: os.stat_result) -> None:
    """Refuse a key file that someone other than this user (or root) can change or read:
    its owner can rewrite it, and whoever may write its directory can replace it."""
    trusted = (os.getuid(), 0)
    mode = info.st_mode
    if not stat.S_ISREG(mode):
        raise ConfigError(f"key file {where!r} is not a regular file")
    if info.st_uid not in trusted:
        raise ConfigError(
            f"key file {where!r} is owned by uid {info.st_uid}, not by this user "
            f"(uid {os.getuid()}) or root: that user could change the keys; run "
            f"'chown {os.getuid()} {where}' or use a key file of your own"
        )
    if mode & (stat.S_IRWXO | stat.S_IWGRP):
        raise ConfigError(
            f"key file {where!r} is accessible to other users (mode "
            f"{stat.S_IMODE(mode):04o}): run 'chmod 600 {where}'"
        )
    check_key_dir(where)


def check_key_dir(where: str) -> None:
    """Refuse key file ``where`` when its directory is another user's or writable by
    group or others (sticky or not): they could replace the file, or plant one first."""
    directory = os.path.dirname(os.path.realpath(where)) or "."
    dir_info = os.stat(directory)
    if (dir_info.st_uid not in (os.getuid(), 0)
            or dir_info.st_mode & (stat.S_IWOTH | stat.S_IWGRP)):
        raise ConfigError(
            f"key file {where!r} is in {directory!r} (owner uid {dir_info.st_uid}, mode "
            f"{stat.S_IMODE(dir_info.st_mode):04o}), which another user can write: they "
            f"could replace the key file; keep keys in a directory only you (or root) can write"
        )
