"""Rotation: drawing new values (generate.py); the workflow and schedule build on it."""
