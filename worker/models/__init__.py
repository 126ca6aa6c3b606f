"""Model definitions, read top to bottom like a paper."""
