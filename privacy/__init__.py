"""Differential privacy, leakage attacks and key material (built on ddcore)."""
