"""The worker: scheduling, the paged KV cache, model execution and sampling (token ids only)."""
