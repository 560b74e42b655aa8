"""``ablate`` stage: zero adapter components, measure KL(P_lora || P_ablated) and the change in
cross-entropy, and export ablated adapters for the benchmarks (Table 2)."""
