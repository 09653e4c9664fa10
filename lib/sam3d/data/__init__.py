"""Data: reading cases, click simulation (shared by training and evaluation)."""
