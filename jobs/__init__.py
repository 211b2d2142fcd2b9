"""Ray job entry points: `python -m jobs.<name> ARGS`, locally or through `ray job submit`.

Inside a Ray job, Ray sets RAY_ADDRESS, and the entry point joins that cluster
instead of starting a local one.
"""
