"""The shipped card presets, one YAML per card, installed as ``lowvram.preset_files`` (read by ``lowvram.presets``)."""
