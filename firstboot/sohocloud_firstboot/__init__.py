"""sohocloud-firstboot: applies a node's NoCloud seed on its first boot (see main.py)."""
