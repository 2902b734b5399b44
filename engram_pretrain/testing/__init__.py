"""Helpers for testing distributed code on CPU (gloo) without a launcher."""
