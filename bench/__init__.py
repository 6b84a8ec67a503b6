"""Benchmarks of iqmaild, run as ``python -m bench <scenario> [--short] [--json]``.

The daemon is measured only through its stable outside interfaces: the
``iqmaild`` CLI (``migrate``, ``directory import``, ``serve``, ``message list``,
``outbox list``, ``ticket show``), the config keys of ``config.example.toml``, its
SMTP port, its link page ``POST /authorize/{token}`` and the mail it hands to its
outbound relay. Nothing here imports ``iqmaild``, so the benchmarks keep working
while the daemon's insides are rebuilt.

Modules, one idea each:

- ``proc``       ports, processes, CPU time of a process tree
- ``baselines``  the bare aiosmtpd sink and Postfix's smtp-sink
- ``backends``   a throwaway SQLite file or PostgreSQL database per run
- ``directory``  generated directories: JSON for the CLI, bulk SQL for 10^6 addresses
- ``daemon``     ``iqmaild serve`` as a subprocess with its config, CLI and log
- ``mail``       realistic customer mail: new tickets, follow-ups, unknown senders
- ``load``       load generation: smtp-source, and an asyncio SMTP client with
                 per-message timing
- ``relay``      a capturing outbound relay (own process) and the parsing of what arrived
- ``expect``     which outbound mail each sent message must cause, and the check
- ``report``     medians, percentiles, ratios, tables
- ``profile``    py-spy around the daemon, summarized by library
- ``scenarios``  ingest, e2e, burst, latency, scale (one module each)
"""
