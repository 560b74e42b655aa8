"""LLM access shared by the labelling stages: SDK clients, a disk cache, bounded concurrency, JSON repair."""
