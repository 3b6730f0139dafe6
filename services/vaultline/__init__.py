"""Vaultline: card tokenization vault with a secure payment IVR."""
