"""Op implementations, one subpackage or module per backend: torch/, triton/, native.py."""
