"""Stage 6, apply: execute plans (tickets, messages, mail intents, audit) in one transaction."""
