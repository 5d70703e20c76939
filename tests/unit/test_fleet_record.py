"""The site record (builder/fleet/record.py): what `fleet build` made, read back by the other fleet
commands, and refused with "run fleet build" when it is missing or no longer matches the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.errors import SohoError
from builder.fleet.record import (FileRef, NodeRecord, file_ref, load_built, new_record, read_record, record_path,
                                  write_record)
from builder.fleet.sitefile import load_site

SITE = """\
site: tiny
domain: tiny.lan
lan: 10.44.0.0/24
admin_ssh_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBbq2hXmJ/G2tU0x8QAb7kYEg8p7Tyvc0LrbI3IG+0yA admin@tiny"]
nodes:
  - {name: gw, role: router, address: 10.44.0.1, mac: "52:54:00:44:00:01"}
  - {name: pc, role: workstation-host, address: 10.44.0.20, mac: "52:54:00:44:00:20", target: pxe}
"""


@pytest.fixture
def built(tmp_path: Path) -> dict:
    """What a `fleet build` of the tiny site leaves: images, manifests, seeds, a netboot set, the
    PXE volume, and the record of them all."""
    site_file = tmp_path / "tiny.yaml"
    site_file.write_text(SITE)
    site = load_site(site_file, known_roles=["router", "workstation-host"], gateway_roles=["router"])
    out = tmp_path / "out"
    (out / "tiny/seeds").mkdir(parents=True)
    (out / "pxe/workstation-host-debian-amd64").mkdir(parents=True)
    files = {"router-debian-amd64-qemu.qcow2": b"disk", "router-debian-amd64-qemu.qcow2.manifest.json": b"{}",
             "pxe/workstation-host-debian-amd64/rootfs.squashfs": b"squash",
             "pxe/workstation-host-debian-amd64.manifest.json": b"{}",
             "tiny/seeds/gw.img": b"seed gw", "tiny/seeds/pc.img": b"seed pc", "tiny/pxe.img": b"volume"}
    for rel, data in files.items():
        (out / rel).write_bytes(data)
    nodes = [
        NodeRecord("gw", "router", file_ref(out, out / "router-debian-amd64-qemu.qcow2"),
                   file_ref(out, out / "router-debian-amd64-qemu.qcow2.manifest.json"),
                   file_ref(out, out / "tiny/seeds/gw.img"), netboot=False, provides=("pxe",), consumes=("logs",)),
        NodeRecord("pc", "workstation-host", file_ref(out, out / "pxe/workstation-host-debian-amd64"),
                   file_ref(out, out / "pxe/workstation-host-debian-amd64.manifest.json"),
                   file_ref(out, out / "tiny/seeds/pc.img"), netboot=True, cluster="worker",
                   vars={"nas_root": "/srv/nas"}),
    ]
    record = new_record(site, site_file, nodes, file_ref(out, out / "tiny/pxe.img"), "gw")
    write_record(record_path(out, "tiny"), record)
    return {"site_file": site_file, "out": out, "record": record}


def test_a_record_reads_back_as_written(built):
    out = built["out"]
    got, site_file = load_built(out, out.parent, str(built["site_file"]))
    assert got == built["record"] and site_file == built["site_file"]
    assert got.node("pc").netboot and got.node("pc").vars == {"nas_root": "/srv/nas"}
    assert got.provider("pxe").name == "gw" and got.provider("nas") is None
    assert got.site.gateway == "gw" and got.site.node("pc").target == "pxe"
    got.check_current(out, site_file, ["gw", "pc"])  # nothing changed since: fine


def test_no_record_says_to_run_fleet_build(built):
    out = built["out"]
    record_path(out, "tiny").unlink()
    with pytest.raises(SohoError, match=r"no .*tiny/site.json: run `sohocloud fleet build .*tiny.yaml` first"):
        load_built(out, out.parent, str(built["site_file"]))


@pytest.mark.parametrize("damage", ["not json", "old format", "wrong shape"])
def test_an_unreadable_record_says_to_run_fleet_build(built, damage):
    path = record_path(built["out"], "tiny")
    data = json.loads(path.read_text())
    text = {"not json": "{", "old format": json.dumps({**data, "format": 0}),
            "wrong shape": json.dumps({**data, "nodes": [{"name": "gw"}]})}[damage]
    path.write_text(text)
    with pytest.raises(SohoError, match="fleet build"):
        read_record(path, "run `sohocloud fleet build tiny` first")


@pytest.mark.parametrize("change, names, blamed", [
    ("tiny.yaml", ["gw"], "tiny.yaml changed since `fleet build`"),
    ("out/router-debian-amd64-qemu.qcow2", ["gw"], "router-debian-amd64-qemu.qcow2 (node gw's image) changed"),
    ("out/tiny/seeds/pc.img", ["pc"], "pc.img (node pc's seed) changed"),
    ("out/pxe/workstation-host-debian-amd64/rootfs.squashfs", ["pc"],
     "workstation-host-debian-amd64 (node pc's image) changed"),
    ("out/tiny/pxe.img", ["pc"], "pxe.img (PXE volume) changed"),
    ("out/tiny/pxe.img", ["gw"], "pxe.img (PXE volume) changed"),  # the PXE server attaches it
])
def test_a_stale_record_names_what_changed_and_says_to_run_fleet_build(built, change, names, blamed):
    root = built["out"].parent
    (root / change).write_bytes(b"rebuilt since")
    with pytest.raises(SohoError, match="run `sohocloud fleet build") as e:
        built["record"].check_current(built["out"], built["site_file"], names)
    assert blamed in str(e.value)


def test_only_what_the_nodes_asked_for_boot_is_checked(built):
    """`fleet up --only gw` needs gw's files and the PXE volume it serves, not the other nodes'."""
    (built["out"] / "tiny/seeds/pc.img").write_bytes(b"rewritten")
    built["record"].check_current(built["out"], built["site_file"], ["gw"])


def test_a_missing_file_is_named_missing(built):
    (built["out"] / "tiny/seeds/gw.img").unlink()
    with pytest.raises(SohoError, match=r"gw.img \(node gw's seed\) is missing since `fleet build`"):
        built["record"].check_current(built["out"], built["site_file"], ["gw"])


def test_file_refs_are_relative_to_the_output_folder(built):
    ref = built["record"].node("gw").image
    assert ref == FileRef("router-debian-amd64-qemu.qcow2", ref.sha256) and len(ref.sha256) == 64
    assert ref.resolve(built["out"]) == built["out"] / "router-debian-amd64-qemu.qcow2"
