"""Model weight files: found in the checkpoints folder, or downloaded from the Hugging Face hub into it.

Layout: every file sits directly in the checkpoints folder under its own name (`ckpts/<file name>`), so a
file a user put there by hand is used as is and nothing is downloaded for it. Downloads go through
`huggingface_hub` (progress bars, resumable: an interrupted download continues from where it stopped), are
staged in `ckpts/.downloads/` and moved into place once complete. Without a network connection a missing
file is one clear `DownloadError` that says where to put it.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

HF_HOST = "huggingface.co"
STAGING_FOLDER = ".downloads"


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


def ensure_file(source: str | os.PathLike, ckpts_dir: str | os.PathLike) -> Path:
    """A local file for `source`: a path, a file name in the checkpoints folder, or a hub URL (downloaded
    when missing). Raises DownloadError when it can be neither found nor downloaded."""
    found = _local_file(source, ckpts_dir)
    if found is not None:
        return found
    hub_file = parse_hf_url(str(source))
    if hub_file is None:
        raise DownloadError(f"Weight file '{source}' not found (looked for it as given and in {ckpts_dir}).")
    return download_hub_file(hub_file, ckpts_dir)


def files_of_definition(files_def: Mapping) -> list[HubFile]:
    """The hub files of one Wan2GP `query_model_files` entry {"repoId", "sourceFolderList", "fileList"}."""
    repo_id = files_def["repoId"]
    return [HubFile(repo_id, f"{folder}/{name}" if folder else name)
            for folder, names in zip(files_def["sourceFolderList"], files_def["fileList"])
            for name in names]


def fetch_model_files(handler: type, base_model_type: str, model_def: Mapping,
                      ckpts_dir: str | os.PathLike) -> list[Path]:
    """Local paths of everything a model needs, the main weights first, downloading what is missing.

    The main weights are the first of the definition's `URLs` already present (Wan2GP lists alternatives,
    e.g. bf16 and int8 files), else the first one downloaded; then the handler's `query_model_files`."""
    urls = model_def.get("URLs")
    if isinstance(urls, str) or not urls:
        raise DownloadError(f"The model definition '{model_def.get('name', base_model_type)}' has no list of "
                            "weight URLs ('URLs').")
    present = [path for path in (_local_file(url, ckpts_dir) for url in urls) if path]
    paths = [present[0] if present else ensure_file(urls[0], ckpts_dir)]
    extra = handler.query_model_files(lambda f: [Path(f).name], base_model_type, dict(model_def))
    for files_def in ([extra] if isinstance(extra, Mapping) else extra or []):
        paths += [ensure_file(f.url, ckpts_dir) for f in files_of_definition(files_def)]
    return paths

