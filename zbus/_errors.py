"""The one error tree of zbus.

Every error zbus raises derives from :class:`ZbusError`. Errors that mean the same thing as a
standard library error also derive from it (``Timeout`` is a ``TimeoutError``, ``ConfigError``
a ``ValueError``), so callers can catch either. Messages say what to do next.
"""

from __future__ import annotations

__all__ = [
    "ZbusError",
    "ConfigError",
    "InvalidName",
    "EnvelopeError",
    "SignatureError",
    "UnknownKeyError",
    "KeyNotAllowedError",
    "PublisherNotAllowedError",
    "ReplayError",
    "VersionError",
    "RoutingError",
    "TransportError",
    "ProxyError",
    "Timeout",
]


class ZbusError(Exception):
    """Base class of every error zbus raises."""


class ConfigError(ZbusError, ValueError):
    """A setting, name or argument is not acceptable; the message says which and why."""


class InvalidName(ConfigError):  # noqa: N818 (public name, reads as a verdict)
    """An exchange, routing key, pattern, pool or key id holds characters zbus does not allow."""


class EnvelopeError(ZbusError):
    """A received message is malformed: wrong frame count, bad msgpack, wrong field types.

    ``reason`` is the short counter name under which the rejection is counted.
    """

    reason = "malformed"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class SignatureError(EnvelopeError):
    """The HMAC of a received message does not match: forged, corrupted, or signed with
    another key under the same key id."""

    reason = "bad_signature"


class UnknownKeyError(SignatureError):
    """A received message names a key id that this key ring does not hold."""

    reason = "unknown_key"


class KeyNotAllowedError(SignatureError):
    """A message carries a valid signature by a key that is not allowed on its exchange.

    The signer holds a real key, so this is a misconfigured publisher or a leaked key being
    used beyond its exchange: worth an alert, unlike random forgeries.
    """

    reason = "key_not_allowed"


class PublisherNotAllowedError(KeyNotAllowedError):
    """A message carries a valid signature by a key bound to other publisher ids than the one
    its envelope claims (``KeyRing(publishers=...)``).

    The signer holds a real key and claims another publisher's identity: a misconfigured
    publisher, or a key holder forging or disturbing another publisher's stream. Worth an
    alert. A :class:`KeyNotAllowedError`, so one ``except`` catches both misuses of a key.
    """

    reason = "publisher_not_allowed"


class ReplayError(EnvelopeError):
    """A received message was seen before, or its timestamp is outside the accepted window."""

    reason = "replay"


class VersionError(EnvelopeError):
    """A received message has a format or message-type version this consumer cannot read."""

    reason = "unknown_version"


class RoutingError(ZbusError):
    """A message cannot be routed: no handler for its topic, or a pool conflict."""


class TransportError(ZbusError):
    """A ZeroMQ socket failed: the endpoint is unreachable, taken, or closed."""


class ProxyError(TransportError):
    """The zbus-proxy refused a request or is not running at the given run directory."""


class Timeout(ZbusError, TimeoutError):  # noqa: N818 (public name, as in STYLE.md)
    """An operation did not complete in the time allowed."""
