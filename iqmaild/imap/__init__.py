"""IMAP mode: a desk mailbox as intake (``ingest/imap.py``) and staff's folder as delivery."""
