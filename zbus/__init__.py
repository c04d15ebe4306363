"""zbus: typed, signed, brokerless messaging over ZeroMQ.

The public API is what this module exports; everything in underscore modules is private.
"""

from ._connection import (
    Connection,
    Exchange,
    LinkStats,
    PoolMember,
    Publisher,
    RetryPolicy,
    Router,
    Subscriber,
    exit_on_sigterm,
)
from ._dispatch import ConsumerCore, ConsumerStats, Delivery, Dispatcher
from ._envelope import Envelope
from ._errors import (
    ConfigError,
    EnvelopeError,
    InvalidName,
    KeyNotAllowedError,
    ProxyError,
    PublisherNotAllowedError,
    ReplayError,
    RoutingError,
    SignatureError,
    Timeout,
    TransportError,
    UnknownKeyError,
    VersionError,
    ZbusError,
)
from ._keys import KeyRing, generate_key
from ._message import Message, MessageFactory, OutgoingMessage
from ._names import TopicPattern
from ._reliable import ReliableMember, ReliableStats
from ._repair import RepairPolicy
from ._replay import ReplayPolicy
from ._settings import Endpoints, Settings, default_run_dir
from ._shared import SharedPublisher, SharedStats

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Connection",
    "ConsumerCore",
    "ConsumerStats",
    "Delivery",
    "Dispatcher",
    "Endpoints",
    "Envelope",
    "EnvelopeError",
    "Exchange",
    "InvalidName",
    "KeyNotAllowedError",
    "KeyRing",
    "LinkStats",
    "Message",
    "MessageFactory",
    "OutgoingMessage",
    "PoolMember",
    "ProxyError",
    "Publisher",
    "PublisherNotAllowedError",
    "ReliableMember",
    "ReliableStats",
    "RepairPolicy",
    "ReplayError",
    "RetryPolicy",
    "Router",
    "RoutingError",
    "ReplayPolicy",
    "Settings",
    "SharedPublisher",
    "SharedStats",
    "SignatureError",
    "Subscriber",
    "Timeout",
    "TopicPattern",
    "TransportError",
    "UnknownKeyError",
    "VersionError",
    "ZbusError",
    "__version__",
    "default_run_dir",
    "exit_on_sigterm",
    "generate_key",
]
