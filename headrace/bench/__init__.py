"""`headrace bench ...`: benchmark programs (see BENCH.md). Results go to JSON files.

offline.py: W1 latency and W2 / W3 / W5 throughput of an engine in this process;
serve.py: W4, an OpenAI HTTP client against a running server;
structured.py: JSON-schema-constrained against free decoding, per output token;
kernels.py: the attention kernels (decode old vs new against the copy bandwidth, prefill).
"""
