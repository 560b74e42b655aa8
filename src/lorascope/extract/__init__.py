"""``extract`` stage: per-token adapter activations (``x . A``) and the MLP-neuron baseline."""
