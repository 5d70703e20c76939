"""The frozen result of stage 1: what one build is made of (BuildConfig), and where the data lives.

Every later stage, and every distro backend, reads only these objects; s1_resolve makes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .schema import ArchSpec, Profile, Target
from .yamlsrc import load_yaml


@dataclass(frozen=True)
class Repo:
    """Where the data lives (profiles/, overlays/, images/, firstboot/)."""

    root: Path

    @classmethod
    def default(cls) -> Repo:
        """The data next to the package (this checkout), or $SOHOCLOUD_REPO."""
        return cls(Path(os.environ.get("SOHOCLOUD_REPO") or Path(__file__).resolve().parents[2]))

    @property
    def profiles(self) -> Path:
        return self.root / "profiles"

    @property
    def overlays(self) -> Path:
        return self.root / "overlays"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def firstboot(self) -> Path:
        return self.root / "firstboot"

    def roles(self) -> list[str]:
        """Buildable roles: every profile not marked `abstract: true`."""
        out = []
        for p in sorted(self.profiles.glob("*.yaml")):
            if not load_yaml(p).data.get("abstract", False):
                out.append(p.stem)
        return out

    def targets(self) -> list[str]:
        return sorted(p.stem for p in self.images.glob("*.yaml"))


@dataclass(frozen=True)
class ExtraFile:
    """A file from outside the archive baked into the image (e.g. a site's k3s binary), checked by sha256."""

    dest: str  # absolute path in the image
    src: Path
    sha256: str
    mode: int = 0o644


@dataclass(frozen=True)
class BuildConfig:
    role: str
    distro: str
    arch: str
    target_name: str
    profile: Profile
    target: Target
    arch_spec: ArchSpec
    repo: Repo
    extra_files: tuple[ExtraFile, ...] = ()

    @property
    def slug(self) -> str:
        """`<role>-<distro>-<arch>-<target>`: the artefact base name (contract)."""
        return f"{self.role}-{self.distro}-{self.arch}-{self.target_name}"

    def all_packages(self) -> tuple[str, ...]:
        """What mmdebstrap installs: the role's and target's packages. The kernel is not
        among them: it is extracted natively (stage 2, the backend's kernel()), never configured."""
        pkgs = list(self.profile.packages) + list(self.target.packages)
        return tuple(dict.fromkeys(pkgs))

    def kernel_module_paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.target.kernel_modules + self.profile.kernel_modules))
