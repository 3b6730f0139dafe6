"""The files Vaultline runs from besides its code: migrations, policies, OpenBao config, IVR flows.

They live at the top of the repository (`infra/`, `ivr_flows/`). `_data/` reaches them by
symlinks in a checkout; a built wheel carries copies there instead (package data, see
pyproject.toml), so an installed `vaultline` finds them from any working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

__all__ = ["ACCESS_POLICY", "IVR_FLOWS_DIR", "MIGRATIONS_DIR", "OPENBAO_DIR"]

_DATA: Final = Path(__file__).resolve().parent / "_data"

MIGRATIONS_DIR: Final = _DATA / "infra" / "postgres"
OPENBAO_DIR: Final = _DATA / "infra" / "openbao"
ACCESS_POLICY: Final = _DATA / "infra" / "access" / "policy.toml"
IVR_FLOWS_DIR: Final = _DATA / "ivr_flows"
