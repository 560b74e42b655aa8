"""``finetune`` stage: the rank-1 LoRA and the full-parameter finetune, one Trainer code path."""
