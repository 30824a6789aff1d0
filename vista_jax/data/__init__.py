"""Event logs, synthetic histories and per-user sequence datasets."""
