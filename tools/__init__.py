"""Offline tools run as `python -m tools.NAME`: data preparation and the autoencoder trainer."""
