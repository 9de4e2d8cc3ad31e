"""Reads a YAML config, preset or run file safely: regular files of bounded size, no alias bombs, a mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

YAML_MAX_BYTES = 1 << 20  # a config is a few KiB; a larger file is not one


YAML_MAX_ALIASES = 32  # anchors are rare in configs; more is how an alias bomb starts (k**(32/k) <= 65536 items)


YAML_MAX_DEPTH = 16  # sections nest two levels deep


def _check_yaml_shape(text: str) -> str | None:
    """Why the YAML ``text`` is refused before it is built (alias bomb, absurd nesting), or None."""
    aliases = depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > YAML_MAX_ALIASES:
                return f"more than {YAML_MAX_ALIASES} aliases (*name)"
        elif isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > YAML_MAX_DEPTH:
                return f"nested more than {YAML_MAX_DEPTH} levels deep"
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return None


def load_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into a ConfigError naming the file.

    Only a regular file of at most 1 MiB is read (a FIFO or device would hang or never end); alias bombs
    and absurd nesting are refused before the document is built."""
    from .validate import read_regular_file

    p = Path(path)
    raw = read_regular_file(p, what, YAML_MAX_BYTES, ConfigError)
    try:
        text = raw.decode("utf-8")
        refused = _check_yaml_shape(text)
        if refused:
            raise ConfigError(f"{what} '{p}' is refused: {refused}", "write the values out plainly")
        data = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{what} '{p}' is not valid YAML: {e}".splitlines()[0], "fix the file's syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{p}' must hold a mapping of sections", "see docs/configuration.md")
    return data
