"""Benchmarks of sharedict beside diskcache, sqlitedict, Redis and LMDB; run ``python -m benchmarks``."""
