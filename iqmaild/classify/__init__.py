"""Stage 4, classify: claim stored messages in batches, parse, ask the rules, plan."""
