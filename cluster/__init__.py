"""Cluster start-up shared by the launchers (`launch/`) and the training processes (`training/`)."""
