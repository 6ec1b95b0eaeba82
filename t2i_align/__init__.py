"""t2i-align: text-image alignment fine-tuning for diffusion models."""
