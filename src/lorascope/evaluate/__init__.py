"""``evaluate`` stage: benchmark generation with the finetuned models, answer extraction and grading."""
