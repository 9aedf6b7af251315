"""API keys: the model, the rules, and the stores (memory, Redis, cached)."""
