"""The agent panel: a web page outside the card data zone, on the crm identity only."""
