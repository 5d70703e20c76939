"""sohocloud: hardened Debian images per role, built from YAML data.

Pipeline stages live in modules named in order: s1_resolve -> s2_rootfs ->
s3_customise -> s4_initrd -> s5_assemble -> s6_manifest.  Everything else
(cli, proc, cache, seed, vm) supports them.
"""

__version__ = "0.1.0"
