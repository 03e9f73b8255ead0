"""Snapshots: the authenticated, encrypted file format (format.py, pure) and the host key (keys.py)."""
