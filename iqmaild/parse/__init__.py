"""Stage 3, parse: raw bytes to the facts the rules read (headers first, MIME when needed)."""
