"""``base`` stage: the model every later stage adapts, probes and ablates."""
