"""HTTP: the authorization link pages, health, metrics and the Customer Panel API."""
