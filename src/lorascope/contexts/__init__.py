"""``contexts`` stage: per-feature max-activating windows, quantile and random samples, statistics."""
