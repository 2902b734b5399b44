"""Engram addressing: tokenizer compression (raw id -> compressed id) and multi-head n-gram hashing."""
