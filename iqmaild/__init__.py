"""iqmaild: the customer-service desk mail daemon.

Mail flows one way through the stages, one package each, in this order:

1. ``ingest``   -- SMTP/LMTP and the Customer Panel take mail in;
2. ``persist``  -- raw bytes committed (group commit) before any 250;
3. ``parse``    -- the header section read as an MTA reads it, into facts;
4. ``classify`` -- batches of stored messages through the rules;
5. ``core``     -- the rules themselves: pure, synchronous, no I/O, no clock;
6. ``apply``    -- a verdict's plan (ticket, message, mail intents, audit) executed;
7. ``deliver``  -- the outbox composes and hands mail to the relay.

Around them: ``storage`` (schema, database handle, directory), ``web`` (link pages,
health, metrics, panel API), ``cli``, ``service`` (the wiring) and ``worker`` (the
process that runs classify/apply/deliver on the second core).
"""

__version__ = "0.1.0"
