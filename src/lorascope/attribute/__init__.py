"""``attribute``: which adapter components and SAE latents the reasoning gain depends on."""
