"""What every assembler gets: one AssembleJob (the shared signature: assemble(job) -> manifest facts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import BuildConfig
from ..s4_initrd import KernelFiles


@dataclass(frozen=True)
class AssembleJob:
    cfg: BuildConfig
    root: Path  # the customised tree (stage 3, kernel modules in: stage 4)
    boot: Path | None  # the boot files' tree (boot loaders, busybox, firmware); node targets only
    kernel: KernelFiles | None  # kernel and initrd (stage 4); node targets only
    work: Path  # scratch space, removed after the build
    artefact: Path  # where the artefact goes (written under a temp name, renamed there)
    ident: dict[str, str]  # identities derived from the inputs (identity.identity)
    epoch: int  # SOURCE_DATE_EPOCH
    key: str  # the build's input hash
