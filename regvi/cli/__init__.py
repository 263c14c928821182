"""The ``regvi`` command line (a thin layer over the library)."""
