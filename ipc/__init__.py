"""The wire and what both sides share: msgspec messages over ZeroMQ, prefix-cache block keys,
model-folder reading (no torch anywhere in ipc/)."""
