"""lorascope: rank-1 LoRA adapters as a measurement device for reasoning finetunes (version: pyproject.toml)."""
