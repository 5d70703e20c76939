"""The machines: booting artefacts in QEMU (qemu.py; `sohocloud boot`: boot.py), reading what their
consoles say (console.py), probing them from the host (probe.py), and SD cards (flash.py)."""
