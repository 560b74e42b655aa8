"""``steer`` stage: add a multiple of an adapter direction while generating and measure backtracking,
answer length and accuracy."""
