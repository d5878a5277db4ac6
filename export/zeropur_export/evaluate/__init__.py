"""``zeropur-export eval``: robust accuracy of a victim with and without ZeroPur."""
