"""core: what every layer needs and nothing of the lab above it.

Paths, the machine (env), the read-bandwidth probe every roofline divides by (bandwidth), timing,
results records and runs, figures (plotting), skips, the one atomic writer (files), argument
checks (checks) and the tolerances every test and notebook shares.
Imports nothing from the rest of labkit.
"""
