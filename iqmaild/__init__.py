"""iqmaild: the customer-service desk mail daemon."""

__version__ = "0.1.0"
