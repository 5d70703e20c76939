"""YAML loading that remembers where every key came from (file:line).

Errors later in the pipeline name the file and line of the offending key,
so the loader keeps PyYAML's node marks beside the plain data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Origin:
    file: Path
    line: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class _MarkLoader(yaml.SafeLoader):
    """SafeLoader that records the mark of every mapping key and list item."""


def _construct_mapping(loader: _MarkLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise ConfigError(
                f"{loader.name}:{key_node.start_mark.line + 1}: duplicate key {key!r}"
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
        loader.key_lines[id(mapping), key] = key_node.start_mark.line + 1
    return mapping


def _construct_sequence(loader: _MarkLoader, node: yaml.SequenceNode) -> list[Any]:
    items = []
    for i, child in enumerate(node.value):
        items.append(loader.construct_object(child, deep=True))
        loader.key_lines[id(items), i] = child.start_mark.line + 1
    return items


_MarkLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_MarkLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


@dataclass
class Located:
    """Plain YAML data plus the origin of every key path in it."""

    data: Any
    origins: dict[KeyPath, Origin]
    file: Path

    def origin(self, path: KeyPath) -> Origin:
        """The origin of *path*, or of its nearest ancestor that has one."""
        for n in range(len(path), -1, -1):
            o = self.origins.get(tuple(path[:n]))
            if o is not None:
                return o
        return Origin(self.file, 1)


def _walk(obj: Any, marks: dict[tuple[int, Any], int], file: Path, prefix: KeyPath,
          out: dict[KeyPath, Origin]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            line = marks.get((id(obj), k))
            if line is not None:
                out[prefix + (k,)] = Origin(file, line)
            _walk(v, marks, file, prefix + (k,), out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            line = marks.get((id(obj), i))
            if line is not None:
                out[prefix + (i,)] = Origin(file, line)
            _walk(v, marks, file, prefix + (i,), out)


def load_yaml(path: Path) -> Located:
    """Parse *path*; a syntax error or a non-mapping document is a ConfigError."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    loader = _MarkLoader(text)
    loader.name = str(path)
    loader.key_lines = {}
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping at the top level, got {type(data).__name__}")
    origins: dict[KeyPath, Origin] = {}
    _walk(data, loader.key_lines, path, (), origins)
    return Located(data, origins, path)
