"""zbus benchmarks: ``python -m bench`` (see bench/README.md).

Throughput and one-way latency of signed zbus messages through a real ``zbus_proxy.Proxy``,
each scenario measured in the same run against raw pyzmq (same frames, same proxy devices),
RabbitMQ (pika) and NATS (nats-py) when their servers answer on 127.0.0.1.
"""
