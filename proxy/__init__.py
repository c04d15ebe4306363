"""zbus_proxy: the per-host zbus-proxy daemon (also usable in-process as ``Proxy``)."""

from ._proxy import Proxy

__all__ = ["Proxy"]
