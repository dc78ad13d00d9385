"""Writing what a run trained in other tools' formats (diffusers.py: a diffusers pipeline)."""
