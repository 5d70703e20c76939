"""`sohocloud fleet build SITE`: the site's secrets (once), each image it needs (once), one seed per
node, the PXE volume of its diskless nodes, and last the site record (record.py) that the other
fleet commands read.

Everything the site needs is resolved and checked first (roles, targets, services, k3s files,
host tools): a mistake fails before the first long build.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import SohoError
from ..image.cache import StageCache, sha256_file
from ..image.config import BuildConfig, ExtraFile, Repo
from ..image.distro.foreign import is_foreign
from ..image.pipeline import build, check_build_host
from ..image.s1_resolve import load_profile, resolve
from ..image.s5_assemble import artefact_path
from ..image.s6_manifest import manifest_path, recorded_sha256
from ..image.schema import Profile
from ..progress import plain_lines
from . import vpn
from .pxe import pxe_volume_path, write_pxe_volume
from .record import NodeRecord, file_ref, new_record, record_path, write_record
from .secrets import SiteSecrets
from .seeds import find_providers, write_node_seed
from .sitefile import Site, SiteNode, load_repo_site, site_path

log = logging.getLogger("sohocloud.fleet")


@dataclass(frozen=True)
class SitePlan:
    """Every image a site needs, resolved and checked before any work."""

    site: Site
    site_file: Path
    # (role, arch, target) -> its image, in build order: the nodes' images, then those their roles
    # use besides their own (the desktop template)
    images: dict[tuple[str, str, str], BuildConfig]
    profiles: dict[str, Profile]  # role -> profile, every role of the repo (for the providers' errors)
    providers: dict[str, SiteNode]  # service -> its node

    @property
    def cfgs(self) -> list[BuildConfig]:
        return list(self.images.values())

    def node_cfg(self, node: SiteNode) -> BuildConfig:
        return self.images[(node.role, node.arch, node.target)]

    def used_images(self, node: SiteNode) -> list[BuildConfig]:
        return [self.images[(ref.role, node.arch, ref.target)] for ref in self.profiles[node.role].images]

    @property
    def netboot(self) -> list[SiteNode]:
        return [n for n in self.site.nodes if self.node_cfg(n).target.netboot]

    def served_images(self) -> list[BuildConfig]:
        """The images nodes use besides their own (the desktop template): the PXE server serves them."""
        return list({c.slug: c for n in self.site.nodes for c in self.used_images(n)}.values())


def fleet_build(repo: Repo, site_arg: str, out: Path, secrets_root: Path, *, use_cache: bool = True) -> Path:
    """Build everything SITE needs; returns the folder of its seeds."""
    plan = plan_site(repo, site_path(repo.root, site_arg))
    check_build_host(plan.cfgs)
    secrets = SiteSecrets(secrets_root / plan.site.name)
    cache = StageCache()
    build_lanes(plan.site.name, plan.cfgs, lambda cfg: build(cfg, out, cache=cache, use_cache=use_cache))
    issue_second_factors(plan.site, secrets)
    issue_vpn_configs(plan.site, secrets)
    seeds = write_seeds(plan, secrets, out)
    volume = write_pxe(plan, seeds, out)
    record = record_site(plan, out, seeds, volume)
    log.info("fleet %s: site record -> %s", plan.site.name, record)
    return out / plan.site.name / "seeds"


# --------------------------------------------------------------------------- the steps


def plan_site(repo: Repo, path: Path) -> SitePlan:
    """Resolve every image the site needs: a bad role or target, or a service no node provides,
    fails now, not after the first build."""
    site = load_repo_site(repo, str(path))
    members = {role for role, _a, _t in site.builds() if load_profile(repo, role).cluster != "none"}
    # k3s (when the site chose it) is baked into the cluster members' images, checked by sha256 first.
    images = {(role, arch, target): resolve(repo, role, target=target, arch=arch,
                                            extra_files=k3s_files(site, path.parent, arch) if role in members else ())
              for role, arch, target in site.builds()}
    built = {role: cfg.profile for (role, _a, _t), cfg in images.items()}
    # Every role's profile, so an error can name the roles that would provide a missing service.
    profiles = {r: built.get(r) or load_profile(repo, r) for r in repo.roles()}
    providers = find_providers(site, profiles)
    extra = sorted({(ref.role, arch, ref.target) for role, arch, _t in site.builds()
                    for ref in profiles[role].images} - set(site.builds()))
    images.update({(role, arch, target): resolve(repo, role, target=target, arch=arch)
                   for role, arch, target in extra})
    plan = SitePlan(site, path, images, profiles, providers)
    if plan.netboot and "pxe" not in providers:
        raise SohoError(f"site {site.name}: {', '.join(n.name for n in plan.netboot)} boot(s) from the network, "
                        "but no node provides pxe (the router's role does, through profiles/pxe-server.yaml)")
    if plan.served_images() and "pxe" not in providers:
        raise SohoError(f"site {site.name}: {', '.join(c.slug for c in plan.served_images())} is fetched by its "
                        "nodes from the PXE server, but no node provides pxe (the router's role does)")
    return plan


def build_lanes(site_name: str, cfgs: list[BuildConfig], build_one: Callable[[BuildConfig], object]) -> None:
    """Build *cfgs* in two lanes at once: foreign-arch images (emulated maintainer scripts,
    one core) beside the native ones (downloads, compression), each lane in order. The other
    lane finishes its current image before a failure is raised."""
    lanes: dict[str, list[BuildConfig]] = {}
    for cfg in cfgs:
        lanes.setdefault(cfg.arch if is_foreign(cfg.arch) else "native", []).append(cfg)
    order = {id(cfg): i for i, cfg in enumerate(cfgs, 1)}
    stop = threading.Event()

    def run_lane(name: str, lane: list[BuildConfig]) -> None:
        if len(lanes) > 1:
            threading.current_thread().name = name  # log lines of this lane carry it
        for cfg in lane:
            if stop.is_set():
                return
            log.info("fleet %s: image %d/%d: %s", site_name, order[id(cfg)], len(cfgs), cfg.slug)
            try:
                build_one(cfg)
            except BaseException:
                stop.set()
                raise

    if len(lanes) == 1:
        run_lane("native", cfgs)
        return
    with plain_lines(), ThreadPoolExecutor(len(lanes)) as pool:
        futures = [pool.submit(run_lane, name, lane) for name, lane in lanes.items()]
    for f in futures:
        f.result()


def issue_vpn_configs(site: Site, secrets: SiteSecrets) -> None:
    """Each VPN peer's client config, secrets/<site>/vpn/<peer>.conf (0600), for the admin to hand over."""
    if site.vpn is None:
        return
    vpn.write_client_configs(site, secrets)
    log.info("fleet %s: VPN: %d peer config(s) in %s", site.name, len(site.vpn.peers), secrets.root / "vpn")


def issue_second_factors(site: Site, secrets: SiteSecrets) -> None:
    """Each person's TOTP secret (made once) with its otpauth URI and QR code, when the site's desktop
    sign-in asks for the second factor: secrets/<site>/users/<name>.totp{,.uri,.png}, for the admin
    to hand over. Only for people group policy gives a desktop: nobody else signs in at a panel."""
    if site.desktops.checker("otp") is None:
        return
    groups = {rule.group for rule in site.desktops.policy}
    for user in (u for u in site.users if groups & set(u.groups)):
        _secret, files = secrets.totp(site.name, user.name)
        log.info("fleet %s: second factor for %s -> %s (QR code: %s)", site.name, user.name, files.secret.name,
                 files.qr)


def write_seeds(plan: SitePlan, secrets: SiteSecrets, out: Path) -> dict[str, Path]:
    """One seed per node (0600: it carries that node's keys): out/<site>/seeds/<node>.img."""
    site = plan.site
    folder = out / site.name / "seeds"
    site_text = plan.site_file.read_text()
    netboot = frozenset(n.name for n in plan.netboot)
    seeds = {}
    for node in site.nodes:
        seeds[node.name] = write_node_seed(site, node, secrets, folder, plan.profiles, site_text, netboot,
                                           plan.site_file.parent, served_images(plan, node, out))
        log.info("fleet %s: seed for %s (%s) -> %s", site.name, node.name, node.role, seeds[node.name])
        cfg = plan.node_cfg(node)
        if "img.xz" in cfg.target.outputs:
            log.info("fleet %s: %s is an SD card: sohocloud flash %s /dev/sdX --seed %s", site.name, node.name,
                     artefact_path(cfg, out), seeds[node.name])
    return seeds


def served_images(plan: SitePlan, node: SiteNode, out: Path) -> tuple[dict[str, str], ...]:
    """The node's other images as the PXE server serves them (http://<server>/images/<file>), with
    the sha256 the node checks before it uses one."""
    if not plan.used_images(node):
        return ()
    server = plan.providers["pxe"]
    # The sha256 the build recorded (SHA256SUMS); the PXE volume step checks the file against it.
    return tuple({"file": f.name, "url": f"http://{server.address}/images/{f.name}",
                  "sha256": recorded_sha256(out, f) or ""}
                 for f in (artefact_path(c, out) for c in plan.used_images(node)))


def write_pxe(plan: SitePlan, seeds: dict[str, Path], out: Path) -> Path | None:
    """The PXE server's volume: the netboot sets, the diskless nodes' seeds, the served images."""
    images = [artefact_path(c, out) for c in plan.served_images()]
    if not plan.netboot and not images:
        return None
    server = plan.providers["pxe"]
    sets = {n.name: artefact_path(plan.node_cfg(n), out) for n in plan.netboot}
    volume = write_pxe_volume(plan.site, server, sets, seeds, out, pxe_volume_path(out, plan.site), images)
    log.info("fleet %s: netboot sets and seeds of %s, %s -> %s (served by %s)", plan.site.name,
             ", ".join(n.name for n in plan.netboot) or "no node", ", ".join(f.name for f in images) or "no image",
             volume, server.name)
    return volume


def record_site(plan: SitePlan, out: Path, seeds: dict[str, Path], volume: Path | None) -> Path:
    """The site record (record.py), written last: it names only what exists, as it is now."""
    nodes = []
    for node in plan.site.nodes:
        cfg, profile = plan.node_cfg(node), plan.profiles[node.role]
        image = artefact_path(cfg, out)
        nodes.append(NodeRecord(
            name=node.name, role=node.role, image=file_ref(out, image), manifest=file_ref(out, manifest_path(image)),
            seed=file_ref(out, seeds[node.name]), netboot=cfg.target.netboot, provides=profile.provides,
            consumes=tuple(dict.fromkeys(profile.uses + profile.may_use)), cluster=profile.cluster,
            images=tuple(file_ref(out, artefact_path(c, out)) for c in plan.used_images(node)),
            vars=dict(profile.vars)))
    pxe = plan.providers.get("pxe")
    record = new_record(plan.site, plan.site_file, nodes, file_ref(out, volume) if volume else None,
                        pxe.name if pxe else "")
    path = record_path(out, plan.site.name)
    write_record(path, record)
    return path


def k3s_files(site: Site, site_dir: Path, arch: str) -> tuple[ExtraFile, ...]:
    """The site's k3s binary and air-gap images, verified now (before any build) and baked into member images."""
    k = site.cluster.k3s
    if site.cluster.engine != "k3s" or k is None:
        return ()
    out = []
    for key, dest, mode in (("binary", "/usr/local/bin/k3s", 0o755),
                            ("images", f"/var/lib/rancher/k3s/agent/images/k3s-airgap-images-{arch}.tar", 0o644)):
        path = (site_dir / getattr(k, key)).resolve()
        want = getattr(k, f"{key}_sha256")
        got = sha256_file(path)
        if got != want:
            raise SohoError(f"site {site.name}: cluster.k3s.{key}: {path} has sha256 {got}, the site file says {want}")
        out.append(ExtraFile(dest, path, want, mode))
    return tuple(out)
