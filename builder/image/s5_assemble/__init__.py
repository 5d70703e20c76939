"""Stage 5 — assemble: the customised tree -> the target's artefact, one module per output kind.

The target's output kind (its first `outputs` entry) picks the module from OUTPUT_KINDS; each
has the same two functions: artefact_path(cfg, out_dir) (the name, a contract) and
assemble(job: AssembleJob) -> manifest facts. Nothing is mounted: filesystems come from the
tree (fs.py), disks from partition images (partitions.py, rawdisk.py), boot partitions from
bootloader.py. Identities come from the inputs (identity.py), so the same inputs give the same disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..cache import digest
from ..config import BuildConfig
from . import card, disk, netboot, oci, template
from .job import AssembleJob


class OutputKind(Protocol):
    def artefact_path(self, cfg: BuildConfig, out_dir: Path) -> Path: ...

    def assemble(self, job: AssembleJob) -> dict: ...


OUTPUT_KINDS: dict[str, OutputKind] = {"qcow2": disk, "img.xz": card, "pxe": netboot, "oci": oci, "squashfs": template}


def output_kind(cfg: BuildConfig) -> OutputKind:
    return OUTPUT_KINDS[cfg.target.outputs[0]]


def artefact_path(cfg: BuildConfig, out_dir: Path) -> Path:
    """The file (or, for a netboot set, the folder) a build writes (contract)."""
    return output_kind(cfg).artefact_path(cfg, out_dir)


def assemble(job: AssembleJob) -> dict:
    return output_kind(job.cfg).assemble(job)


def assemble_inputs(cfg: BuildConfig) -> str:
    """What the assembly depends on beyond the tree (an input of the artefact)."""
    return digest([repr(cfg.target), repr(cfg.profile.container), repr(cfg.profile.disks)])
