"""Model licences: a model definition's `license` entry is shown before the app first downloads that model's
weights, and accepted once.

"Once" means: the first time weights under a licence would be downloaded, the CLI prints the notice (and asks
on a terminal) and the UI shows it with an accept button; after it is accepted (there, or with
`--accept-license`) it is never asked again, for any model under the same licence, in the CLI or the UI. The
acceptance is remembered in the settings folder (`accepted_licenses.json`). Files a user already has are
never blocked, and nothing here runs for --help or --dry-run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shared.settings import write_json_atomic

ACCEPTED_FILE = "accepted_licenses.json"


@dataclass(frozen=True)
class License:
    id: str  # what an acceptance is recorded under
    name: str
    notice: str
    urls: tuple[str, ...] = ()

    def text(self) -> str:
        """The notice and where to read the terms, as the CLI prints it."""
        return "\n".join([f"Licence: {self.name}", self.notice, *(f"  {url}" for url in self.urls)])

    def markdown(self) -> str:
        links = " · ".join(f"[{Path(url).name or url}]({url})" for url in self.urls)
        return f"**Licence: {self.name}.** {self.notice}" + (f" Terms: {links}" if links else "")


def license_of(definition: Mapping[str, Any]) -> License | None:
    """The licence a model definition names (its `license` entry: {"id", "name", "notice", "urls"}), or None."""
    entry = definition.get("license")
    if not isinstance(entry, Mapping) or not entry.get("id"):
        return None
    return License(str(entry["id"]), str(entry.get("name", entry["id"])), str(entry.get("notice", "")),
                   tuple(str(u) for u in entry.get("urls", ())))


class LicenseNotAccepted(RuntimeError):
    """Weights under a licence the user has not accepted would be downloaded."""

    def __init__(self, license: License):
        self.license = license
        super().__init__(f"The weights are under the {license.name} licence, which must be accepted before they are "
                         "downloaded: run again with --accept-license (asked once, then remembered).")


class LicenseStore:
    """The licences accepted so far, in `<folder>/accepted_licenses.json` (None: remembered for this run only)."""

    def __init__(self, folder: str | Path | None):
        self.path = Path(folder) / ACCEPTED_FILE if folder is not None else None
        self._session: set[str] = set()

    def _read(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def accepted(self, license: License) -> bool:
        return license.id in self._session or license.id in self._read()

    def accept(self, license: License) -> None:
        self._session.add(license.id)
        if self.path is not None:
            when = datetime.now(timezone.utc).isoformat(timespec="seconds")
            write_json_atomic(self.path, {**self._read(), license.id: {"name": license.name, "accepted": when}})
