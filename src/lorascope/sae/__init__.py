"""``sae`` stage: a cross-layer BatchTopK sparse autoencoder over the whole adapter state."""
