"""Relay storage: the Store interface and its SQLite implementation."""
