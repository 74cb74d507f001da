"""Small rules every program shares: errors, dtype names, expert-id syntax, argument checks."""
