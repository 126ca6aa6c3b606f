"""headrace: an LLM inference server. `LLM` is the offline entry point."""
