"""Signing keys: a ring of keys by id, one of them active for signing.

Key material never appears in ``repr``, ``str`` or log lines.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ._errors import ConfigError, UnknownKeyError
from ._names import validate_name

__all__ = ["KeyRing", "MIN_KEY_BYTES", "generate_key"]

MIN_KEY_BYTES = 16
DEFAULT_KEY_ID = "default"


def generate_key() -> bytes:
    """A fresh 32-byte random signing key."""
    return os.urandom(32)


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

    def ids(self) -> list[str]:
        return sorted(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __repr__(self) -> str:
        return f"KeyRing(ids={self.ids()!r}, active={self._active!r})"
