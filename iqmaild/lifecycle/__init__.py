"""The data's life cycle: retention periods, data subjects' rights."""
