"""Data facts: class names, prompt templates; no code that touches models."""
