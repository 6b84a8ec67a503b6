"""Stage 7, deliver: the outbox composes our mail and hands it to the relay."""
