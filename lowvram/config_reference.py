"""docs/configuration.md: every config field, its default, choices and help, as Markdown tables per section."""

from __future__ import annotations

import dataclasses

from .config import SECTIONS


def markdown_reference() -> str:
    """Every field as a Markdown table per section (docs/configuration.md is this text)."""
    lines = ["# Configuration reference", "",
             "Generated from `lowvram/config.py` (`python -m lowvram.config_reference > docs/configuration.md`).",
             "Set any field with `--set section.key=value`, in a `--config` YAML file, or in a preset's `config:`.",
             ""]
    for section, cls in SECTIONS.items():
        lines += [f"## {section}", "", "| field | default | meaning |", "|---|---|---|"]
        defaults = cls()
        for f in dataclasses.fields(cls):
            default = getattr(defaults, f.name)
            choices = f.metadata.get("choices")
            text = f.metadata.get("help", "").replace("|", "\\|")
            if choices:
                text += " Choices: " + ", ".join(f"`{c}`" for c in choices) + "."
            lines.append(f"| `{section}.{f.name}` | `{default!r}` | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_reference())
