"""sohocloud: hardened Debian images per role, built from YAML data, and the office booted from them.

Three parts: image/ (the pipeline, stages in module order s1..s6), fleet/ (the site runtime:
site file, secrets, seeds, fleet build/up/test/down), machine/ (QEMU boot, SD-card flashing).
cli.py dispatches; errors, proc (the subprocess wrapper), progress and seed (the NoCloud format)
are shared by all three.
"""

__version__ = "0.1.0"
