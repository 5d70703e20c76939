"""The image pipeline: profiles + a target -> one artefact, in stages whose modules are named in order.

s1_resolve    YAML layers + target + arch -> one frozen BuildConfig (all validation, before any work)
s2_rootfs     the distro backend's base trees (distro/): rootfs, kernel, boot files; tars cached by input hash
s3_customise  overlays, accounts, hardening, services, firstboot: edits of the tree, nothing run inside it
s4_initrd     the kernel into the tree, and our own initrd
s5_assemble   one module per output kind: qcow2 disk, SD card, netboot set, OCI archive
s6_manifest   what was made and how to boot it, beside the artefact; SHA256SUMS

pipeline.build runs them for one BuildConfig. schema (the typed config), yamlsrc (YAML with
file:line), cache (the stage cache) and identity (ids and times from the inputs) serve them.
"""
