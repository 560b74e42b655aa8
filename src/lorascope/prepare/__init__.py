"""``prepare`` stage: s1K-1.1 (hub, local file or synthetic) formatted as s1 did, tokenized, validated."""
