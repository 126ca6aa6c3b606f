"""The wire between gateways and workers: msgspec messages over ZeroMQ."""
