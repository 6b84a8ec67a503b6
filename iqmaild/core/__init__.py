"""Stage 5, the rules: pure and synchronous (no I/O, no clock); everything else adapts."""
