"""The console's pages: ``common`` (sign-in, language, errors), ``staff`` and ``resident``."""
