"""Installed as ``transferkit.recipes`` (setup.cfg's package_dir), so the YAML files here are package data
that :mod:`transferkit.core.bundled` finds by name from a wheel or an editable install alike."""
