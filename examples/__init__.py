"""Runnable examples of using the platform from outside (see docs/partners.md)."""
