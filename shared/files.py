"""Model weight files: found in the checkpoints folder, or downloaded from the Hugging Face hub into it.

Layout: every file sits directly in the checkpoints folder under its own name (`ckpts/<file name>`), so a
file a user put there by hand is used as is and nothing is downloaded for it. Downloads go through
`huggingface_hub` (progress bars, resumable: an interrupted download continues from where it stopped), are
staged in `ckpts/.downloads/` and moved into place once complete. When files cannot be downloaded (no
network, hub unreachable) one `DownloadError` names every missing file, its URL and where to put it; an
unreachable hub is found with one quick connection attempt instead of the hub client's retries per file.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

HF_HOST = "huggingface.co"
STAGING_FOLDER = ".downloads"
REACH_TIMEOUT_S = 5.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


class DownloadError(RuntimeError):
    """A weight file is missing and could not be downloaded; the message says what to do."""


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    path: str  # inside the repo, e.g. "split_files/vae/qwen_image_vae.safetensors"
    revision: str = "main"

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def url(self) -> str:
        return f"https://{HF_HOST}/{self.repo_id}/resolve/{self.revision}/{self.path}"


def build_hf_url(repo_id: str, *path_parts: str) -> str:
    """`https://huggingface.co/<repo>/resolve/main/<path>` (Wan2GP's `shared.utils.hf.build_hf_url`)."""
    path = "/".join(part.strip("/") for part in path_parts if part)
    return HubFile(repo_id, path).url


def parse_hf_url(url: str) -> HubFile | None:
    """The hub file of a `https://huggingface.co/<owner>/<repo>/(resolve|blob)/<revision>/<path>` URL, else None."""
    parsed = urlparse(url)
    parts = [unquote(p) for p in parsed.path.split("/") if p]
    if parsed.netloc != HF_HOST or len(parts) < 5 or parts[2] not in ("resolve", "blob"):
        return None
    return HubFile(f"{parts[0]}/{parts[1]}", "/".join(parts[4:]), parts[3])


def locate_file(name_or_path: str | os.PathLike, ckpts_dir: str | os.PathLike) -> Path | None:
    """An existing file given by path, or `<ckpts_dir>/<file name>`; None when neither exists."""
    given = Path(name_or_path).expanduser()
    if given.is_file():
        return given
    in_ckpts = Path(ckpts_dir) / given.name
    return in_ckpts if in_ckpts.is_file() else None


def check_ckpts_dir(ckpts_dir: str | os.PathLike) -> None:
    """A checkpoints folder must be a folder (or not exist yet): never download into a file's path."""
    folder = Path(ckpts_dir)
    for candidate in (folder, *folder.absolute().parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise DownloadError(f"The checkpoints folder {folder} is not a folder ({candidate} is a file): "
                                    "choose a folder with --ckpts-dir.")
            return


def hub_unreachable_reason() -> str | None:
    """Why the hub cannot be reached (offline mode, no connection), or None when it may be. One connection
    attempt with a short timeout; behind a proxy nothing is probed (the download itself will tell)."""
    if hub_constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    endpoint = urlparse(hub_constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as e:
        return f"{endpoint.hostname} is unreachable ({e.strerror or e})"
    return None


def download_hub_file(hub_file: HubFile, ckpts_dir: str | os.PathLike) -> Path:
    """`<ckpts_dir>/<file name>`, downloaded from the hub unless it is already there."""
    ckpts_dir = Path(ckpts_dir)
    target = ckpts_dir / hub_file.name
    if target.is_file():
        return target
    staging = ckpts_dir / STAGING_FOLDER
    print(f"Downloading {hub_file.name} from {hub_file.repo_id} into {ckpts_dir} ...", file=sys.stderr)
    try:
        downloaded = hf_hub_download(hub_file.repo_id, hub_file.path, revision=hub_file.revision, local_dir=staging)
    except LocalEntryNotFoundError:
        raise DownloadError(
            f"Cannot download {hub_file.name}: the Hugging Face hub is unreachable (offline?). Get it from "
            f"{hub_file.url} and put it at {target}."
        ) from None
    except HfHubHTTPError as error:
        reason = str(error).splitlines()[0]
        raise DownloadError(f"Cannot download {hub_file.name} from {hub_file.url}: {reason}") from None
    os.replace(downloaded, target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _local_file(source: str | os.PathLike, ckpts_dir: str | os.PathLike) -> Path | None:
    hub_file = parse_hf_url(str(source))
    return locate_file(hub_file.name if hub_file else source, ckpts_dir)


def files_of_definition(files_def: Mapping) -> list[HubFile]:
    """The hub files of one Wan2GP `query_model_files` entry {"repoId", "sourceFolderList", "fileList"}."""
    repo_id = files_def["repoId"]
    return [HubFile(repo_id, f"{folder}/{name}" if folder else name)
            for folder, names in zip(files_def["sourceFolderList"], files_def["fileList"])
            for name in names]


def model_sources(handler: type, base_model_type: str, model_def: Mapping, ckpts_dir: str | os.PathLike) -> list[str]:
    """Everything a model needs, as paths or hub URLs, the main weights first: the first of the definition's
    `URLs` already present (Wan2GP lists alternatives, e.g. bf16 and int8 files), else the first one; then the
    handler's `query_model_files`."""
    urls = model_def.get("URLs")
    if isinstance(urls, str) or not urls:
        raise DownloadError(f"The model definition '{model_def.get('name', base_model_type)}' has no list of "
                            "weight URLs ('URLs').")
    main = next((str(url) for url in urls if _local_file(url, ckpts_dir)), str(urls[0]))
    extra = handler.query_model_files(lambda f: [Path(f).name], base_model_type, dict(model_def))
    return [main] + [f.url for files_def in ([extra] if isinstance(extra, Mapping) else extra or [])
                     for f in files_of_definition(files_def)]


def missing_model_files(handler: type, base_model_type: str, model_def: Mapping,
                        ckpts_dir: str | os.PathLike) -> list[str]:
    """The sources of `model_sources` that are not on disk yet."""
    return [src for src in model_sources(handler, base_model_type, model_def, ckpts_dir)
            if _local_file(src, ckpts_dir) is None]


def _missing_message(sources: list[str], ckpts_dir: Path, reason: str) -> str:
    count = f"{len(sources)} weight files are" if len(sources) > 1 else "A weight file is"
    lines = [f"{count} missing and cannot be downloaded: {reason}. Download and put them here:"]
    for src in sources:
        hub_file = parse_hf_url(src)
        name = hub_file.name if hub_file else Path(src).name
        lines.append(f"  {hub_file.url if hub_file else src}  ->  {ckpts_dir / name}")
    return "\n".join(lines)


def fetch_model_files(handler: type, base_model_type: str, model_def: Mapping,
                      ckpts_dir: str | os.PathLike) -> list[Path]:
    """Local paths of everything a model needs (`model_sources`), downloading what is missing; a
    DownloadError names every file that could not be had, at once."""
    check_ckpts_dir(ckpts_dir)
    ckpts_dir = Path(ckpts_dir)
    sources = model_sources(handler, base_model_type, model_def, ckpts_dir)
    missing = [src for src in sources if _local_file(src, ckpts_dir) is None]
    not_on_hub = [src for src in missing if parse_hf_url(src) is None]
    if not_on_hub:
        raise DownloadError(_missing_message(not_on_hub, ckpts_dir, "they are not hub URLs"))
    reason = hub_unreachable_reason() if missing else None
    if reason:
        raise DownloadError(_missing_message(missing, ckpts_dir, reason))
    failed = []
    for src in missing:
        try:
            download_hub_file(parse_hf_url(src), ckpts_dir)
        except DownloadError as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(src)
    if failed:
        raise DownloadError(_missing_message(failed, ckpts_dir, "the downloads failed (see above)"))
    return [_local_file(src, ckpts_dir) for src in sources]
