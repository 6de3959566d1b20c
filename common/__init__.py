"""Shared by every package: error types with one-line messages, checkpoint reading."""
