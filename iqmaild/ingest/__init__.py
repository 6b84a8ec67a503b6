"""Stage 1, ingest: where mail enters (SMTP/LMTP listener, Customer Panel API)."""
