"""inference: running a model: the caches it plugs in, generation loops, the fast decode path.

Builds on ``labkit.models`` (one forward per architecture, which takes any cache object here).
"""
