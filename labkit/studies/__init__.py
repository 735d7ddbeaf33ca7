"""studies: one module per notebook, named after it (``01_kv_cache`` -> ``kv_cache``).

What a notebook measures, records and draws lives here, tested; the notebook calls it, and
``labkit bench`` calls the same functions. A study imports any layer below it, never another study.
"""
