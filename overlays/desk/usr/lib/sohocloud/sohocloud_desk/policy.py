"""Group policy: the first rule whose group the person is in says which machine type and network
their desktop gets. No matching rule: no desktop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    return int(text[:-1]) * SIZE_UNITS[text[-1]]


@dataclass(frozen=True)
class MachineType:
    name: str
    cpus: str
    memory: int  # bytes
    pids: int


@dataclass(frozen=True)
class Grant:
    machine: MachineType
    network: str  # "none" | "lan"


def machine_types(settings: dict[str, Any]) -> dict[str, MachineType]:
    return {name: MachineType(name, str(m["cpus"]), parse_size(m["memory"]), int(m["pids"]))
            for name, m in settings.items()}


def grant_for(groups: set[str], rules: list[dict[str, str]], types: dict[str, MachineType]) -> Grant | None:
    for rule in rules:
        if rule["group"] in groups:
            return Grant(types[rule["machine"]], rule["network"])
    return None
