"""De-scoping: find the card numbers a CRM already stores, and replace them with tokens."""
