"""Side-by-side benchmarks of pmg-torch against the reference implementations; run ``python benchmarks/run.py``."""
