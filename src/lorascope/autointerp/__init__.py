"""LLM labels for features from their max-activating contexts: prompts, reply parsers, an offline baseline."""
