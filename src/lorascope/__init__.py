"""lorascope: rank-1 LoRA adapters as a measurement device for reasoning finetunes."""

__version__ = "0.1.0"
