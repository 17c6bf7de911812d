"""The package version, in a module of its own so that any layer can read it without importing
``selfsup``'s lazy library API (which reaches up to ``selfsup.cluster``)."""

__version__ = "0.1.0"
