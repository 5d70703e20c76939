"""Secrets off the card: a writable seed directory loses its user-data once both phases are done."""

from __future__ import annotations

import os

import yaml

from .context import SEED_DIRS_LIST, info, warn
from .files import write_atomic
from .seed import safe_load
from .seedrules import USER_DATA_HEADER

TYPE_CHECKING = False  # typing costs time on a node's path to SSH: annotations only (see main.py)
if TYPE_CHECKING:
    from .context import Ctx

# What a scrubbed user-data starts with: a seed directory scrubbed before is left as it is.
SCRUBBED_HEAD = f"{USER_DATA_HEADER}\n# sohocloud-firstboot applied"
SCRUBBED = (SCRUBBED_HEAD + " this seed (instance {iid}) and removed it from here:\n"
            "# it carried this node's keys and passwords. Write a new seed to provision again.\n")


def wipe_in_place(path) -> None:
    """Zeros over the file's own bytes, then fsync. A rename alone leaves the old clusters of a card's
    FAT partition as they were: anyone reading the card raw would still find the keys there."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        left = os.fstat(fd).st_size
        zeros = bytes(min(left, 1 << 16))
        while left > 0:
            left -= os.write(fd, zeros[:left])
        os.fsync(fd)
    finally:
        os.close(fd)


def scrub_seed_dirs(ctx: Ctx, instance_id: str) -> None:
    """Both phases are done: the seed's user-data (keys, passwords, tokens) leaves the writable
    seed directory (a card's boot partition, readable by anyone who pulls the card). meta-data
    stays, so later boots still recognise the instance."""
    try:
        lines = ctx.path(SEED_DIRS_LIST).read_text().splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        d = ctx.path(line)
        user_data = d / "user-data"
        if not user_data.is_file():
            continue
        try:
            meta = safe_load((d / "meta-data").read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        if str(meta.get("instance-id", "")) != instance_id or user_data.read_bytes().startswith(SCRUBBED_HEAD.encode()):
            continue
        try:
            wipe_in_place(user_data)  # a power cut from here on: the next boot scrubs again
            write_atomic(user_data, SCRUBBED.format(iid=instance_id).encode(), 0o600)
            info(f"seed: secrets removed from /{line.lstrip('/')}/user-data")
        except OSError as e:
            warn(f"seed: could not remove the secrets from /{line.lstrip('/')}/user-data: {e.strerror}")
