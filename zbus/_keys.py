"""Signing keys: a ring of keys by id, one of them active for signing.

Key material never appears in ``repr``, ``str`` or log lines.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from ._errors import ConfigError, UnknownKeyError
from ._names import validate_name

__all__ = ["KeyRing", "MIN_KEY_BYTES", "format_key_file", "generate_key"]

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


class KeyRing:
    """Keys by id. ``active`` signs; every key in the ring verifies.

    Rotation without downtime: add the new key to every consumer's ring, then make it active
    on the publishers, then remove the old one.
    """

    __slots__ = ("_active", "_active_key", "_keys")

    def __init__(self, keys: Mapping[str, bytes], active: str | None = None) -> None:
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

    def get(self, key_id: str) -> bytes:
        try:
            return self._keys[key_id]
        except KeyError:
            raise UnknownKeyError(
                f"no key with id {key_id!r} in this key ring (it holds {sorted(self._keys)})"
            ) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KeyRing:
        """Read a key file (as ``zbus keygen`` writes it) into a ring.

        Lines are ``KEY_ID HEX`` or just ``HEX`` (key id ``default``); ``#`` starts a
        comment. The first key is the active (signing) one; all of them verify. A file that
        others can read or write, or that its group can write, is refused.
        """
        where = str(path)
        try:
            mode = os.stat(path).st_mode
            if mode & (stat.S_IRWXO | stat.S_IWGRP):
                raise ConfigError(
                    f"key file {where!r} is accessible to other users (mode "
                    f"{stat.S_IMODE(mode):04o}): run 'chmod 600 {where}'"
                )
            text = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read key file {where!r}: {exc}") from None
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
        return cls(keys, active=next(iter(keys)))

    def ids(self) -> list[str]:
        return sorted(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __repr__(self) -> str:
        return f"KeyRing(ids={self.ids()!r}, active={self._active!r})"
