"""Vaultline tests."""
