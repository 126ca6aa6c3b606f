"""The gateway: OpenAI-compatible HTTP API, tokenization, detokenization, routing."""
