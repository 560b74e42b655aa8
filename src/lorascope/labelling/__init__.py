"""Labelling features with an LLM, shared by ``autointerp`` and ``categorize``: the paper's prompts and their
reply parsers (``prompts``), the cached client and the ask-and-re-ask loop (``session``), and the offline
non-LLM baseline (``heuristic``)."""
