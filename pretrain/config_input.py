"""The input of a training config before any type check: a YAML file merged with dotted overrides
(``optim.lr=1e-3``, parsed by OmegaConf) as plain containers. ``pretrain.config`` checks and validates it.

A run's own ``config.yaml`` (in its run folder, next to ``ds_config.json``) names that folder as its
``run_dir``, so a run folder resumes from anywhere after a move.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from pretrain.errors import ConfigError


def is_run_config(path: str | Path) -> bool:
    """``path`` is the ``config.yaml`` a run wrote into its own run folder (next to its ``ds_config.json``).

    Such a file names that folder as its ``run_dir``, whatever ``run_dir`` it records: the run folder is where
    the file is, so ``lmforge train RUN_DIR/config.yaml`` resumes the run from any directory and after the
    folder was moved (the recorded ``run_dir`` may be relative to the directory the run was started in).
    """
    from pretrain.layout import DS_CONFIG_FILE, RUN_CONFIG_FILE

    path = Path(path)
    return path.name == RUN_CONFIG_FILE and (path.parent / DS_CONFIG_FILE).is_file()


def merged_input(path: str | Path | None, overrides: Sequence[str]) -> dict:
    """The YAML file merged with the dotted overrides, as plain containers (no type checks yet)."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    try:
        base: Any = OmegaConf.create({})
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"{path}: config file not found")
            base = OmegaConf.load(str(path))
            if is_run_config(path) and isinstance(base, DictConfig):
                base.run_dir = str(Path(path).resolve().parent)  # run_dir= on the command line still wins
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        raw = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values, not {type(raw).__name__}")
    return raw
