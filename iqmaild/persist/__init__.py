"""Stage 2, persist: raw mail committed durably before the 250, many per commit."""
