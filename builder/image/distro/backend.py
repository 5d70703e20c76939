"""The contract of a distro backend: stage 2's base trees, each one tar cached by its input hash.

Stage 2 (s2_rootfs) asks the backend of the profile's `distro.name` for:
- the role's root tree (rootfs): its packages installed, nothing of the target in it, so one tree
  serves every target of an arch;
- a node target's kernel, extracted (never installed or configured): /boot/vmlinuz-*, its modules,
  DTBs, and a `packages` file of `Package:`/`Version:` lines;
- a node target's boot files: boot loaders, a static busybox for our initrd, board firmware.
Stage 3 asks it what the customised tree has installed (name -> version, for the manifest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..cache import StageCache, StageResult
from ..config import BuildConfig


class DistroBackend(Protocol):
    """A module (or object) with these names: debian.py is one."""

    name: str

    def host_tools(self) -> tuple[str, ...]:
        """Host commands its builds run (checked before any work)."""
        ...

    def rootfs_inputs(self, cfg: BuildConfig) -> dict[str, str]:
        """Every input of the rootfs tar, by name (the cache key; --explain names what changed)."""
        ...

    def rootfs(self, cfg: BuildConfig, cache: StageCache, *, use_cache: bool) -> StageResult:
        ...

    def kernel_inputs(self, cfg: BuildConfig) -> dict[str, str]:
        ...

    def kernel(self, cfg: BuildConfig, cache: StageCache, *, use_cache: bool) -> StageResult:
        ...

    def bootfiles(self, cfg: BuildConfig, cache: StageCache, *, use_cache: bool) -> StageResult:
        ...

    def installed_packages(self, root: Path) -> dict[str, str]:
        """name -> version of what the tree at *root* has installed."""
        ...
