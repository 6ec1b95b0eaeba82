"""ToyWorld: a synthetic compositional world with an exact judge (see world.py)."""
