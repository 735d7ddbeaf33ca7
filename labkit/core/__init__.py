"""core: what every layer needs and nothing of the lab above it.

Paths, the machine (env), timing, results records, figures (plotting), skips, the one atomic
writer (files), argument checks (checks) and the tolerances every test and notebook shares.
Imports nothing from the rest of labkit.
"""
