"""``categorize`` stage: shared functional categories for LoRA directions and MLP neurons (paper B.2a), one
category per labelled feature (B.2b), SAE subcategories, and the data of the paper's Figures 1 and 2."""
