"""Model weight files: found in the checkpoints folder, or downloaded from the Hugging Face hub into it.

Layout: downloads land directly in the checkpoints folder under their own name (`ckpts/<file name>`). A file
already there is used as is, and so is one in the layouts other apps keep (`hub_file_candidates`): upstream
Wan2GP's `ckpts/split_files/<folder>/<file>` and ComfyUI's `models/diffusion_models`, `text_encoders`, `vae`
(point --ckpts-dir at ComfyUI's `models/` folder). Downloads go through `huggingface_hub` (progress bars,
resumable: an interrupted download continues from where it stopped), are staged in `ckpts/.downloads/`,
checked against the size and SHA-256 the model definition gives (`file_checks`) and only then moved into
place; a file that does not match is deleted and reported, never loaded. When files cannot be downloaded (no
network, hub unreachable) one `DownloadError` names every missing file, its URL and where to put it; an
unreachable hub is found with one quick connection attempt instead of the hub client's retries per file.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from tqdm import tqdm

from shared.settings_schema import file_sha256

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
    """An existing file (or diffusers-format folder) given by path, or `<ckpts_dir>/<file name>`; None when
    neither exists."""
    given = Path(name_or_path).expanduser()
    if given.is_file() or given.is_dir():
        return given
    in_ckpts = Path(ckpts_dir) / given.name
    return in_ckpts if in_ckpts.is_file() else None


# ComfyUI's older folder names for the same kinds of files (it reads both)
_COMFYUI_ALIASES = {"diffusion_models": ("unet",), "text_encoders": ("clip",)}


def hub_file_candidates(hub_file: HubFile, ckpts_dir: str | os.PathLike) -> list[Path]:
    """Where a hub file may already be, in order: `ckpts/<name>` (this app's downloads), `ckpts/<repo path>`
    (upstream Wan2GP keeps a repo's subfolders, e.g. `ckpts/split_files/vae/...`), then `ckpts/<its folder>/
    <name>` (ComfyUI's `models/` layout: `diffusion_models/` (or `unet/`), `text_encoders/` (or `clip/`), `vae/`)."""
    folder = Path(ckpts_dir)
    candidates = [folder / hub_file.name, folder / hub_file.path]
    parent = Path(hub_file.path).parent.name
    if parent:
        candidates += [folder / name / hub_file.name for name in (parent, *_COMFYUI_ALIASES.get(parent, ()))]
    return list(dict.fromkeys(candidates))


@dataclass(frozen=True)
class FileCheck:
    """What a downloaded file must be (None: not known)."""

    size: int | None = None
    sha256: str | None = None


def file_checks(model_def: Mapping) -> dict[str, FileCheck]:
    """The definition's `file_checks` ({file name: {"size": bytes, "sha256": hex}}), by file name. Upstream
    Wan2GP ignores the key (its `URLs` stay plain strings)."""
    checks = model_def.get("file_checks") or {}
    if not isinstance(checks, Mapping):
        raise DownloadError(f"The model definition '{model_def.get('name', '?')}': 'file_checks' must map file "
                            "names to {\"size\": bytes, \"sha256\": hex}.")
    out = {}
    for name, check in checks.items():
        check = check if isinstance(check, Mapping) else {}
        size, sha256 = check.get("size"), check.get("sha256")
        out[str(name)] = FileCheck(int(size) if size is not None else None, str(sha256).lower() if sha256 else None)
    return out


def verify_file(path: Path, check: FileCheck) -> str | None:
    """Why `path` is not the file `check` describes (its size, then its SHA-256, with a progress bar), or None."""
    size = path.stat().st_size
    if check.size is not None and size != check.size:
        return f"it is {size:,} bytes instead of {check.size:,}"
    if check.sha256:
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"Checking {path.name} (SHA-256)",
                  file=sys.stderr, leave=False) as bar:
            digest = file_sha256(path, bar.update)
        if digest != check.sha256:
            return f"its SHA-256 is {digest[:12]}... instead of {check.sha256[:12]}..."
    return None


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


def download_hub_file(hub_file: HubFile, ckpts_dir: str | os.PathLike, check: FileCheck | None = None) -> Path:
    """`<ckpts_dir>/<file name>`, downloaded from the hub unless it is already there; a download that fails
    `check` is deleted and raised as a DownloadError."""
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
    problem = verify_file(Path(downloaded), check) if check else None
    if problem:
        shutil.rmtree(staging, ignore_errors=True)  # the file and the hub client's record of it: a retry starts anew
        raise DownloadError(f"The downloaded {hub_file.name} is not the expected file ({problem}), so it was "
                            f"deleted and not loaded. Try again; if it happens again, the file at {hub_file.url} "
                            "has changed (please report it).")
    os.replace(downloaded, target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _local_file(source: str | os.PathLike, ckpts_dir: str | os.PathLike) -> Path | None:
    hub_file = parse_hf_url(str(source))
    if hub_file is None:
        return locate_file(source, ckpts_dir)
    return next((path for path in hub_file_candidates(hub_file, ckpts_dir) if path.is_file()), None)


# Wan2GP's file-name tokens of the quantized alternatives in a definition's `URLs` (its `get_model_filename`)
_QUANTIZATION_TOKENS = {"int8": ("int8",), "int8_convrot": ("convrot", "int8"), "fp8": ("fp8",)}


def is_prequantized(source: str | os.PathLike) -> bool:
    """Whether a weight file's name says it is already quantized (Wan2GP's tokens, or GGUF)."""
    name = Path(str(source)).name.lower()
    return name.endswith(".gguf") or any(t in name for tokens in _QUANTIZATION_TOKENS.values() for t in tokens)


def choose_weights(urls: list[str], ckpts_dir: str | os.PathLike, quantization: str | None = None) -> str:
    """The one of a definition's `URLs` to use, as upstream Wan2GP chooses by its `transformer_quantization`:
    with `quantization` ("int8", "int8_convrot", "fp8") the files named for it come first, else the list's
    order (bf16 first). A file already on disk wins over a download; else the first of that order."""
    tokens = _QUANTIZATION_TOKENS.get(quantization or "", ())

    def rank(url: str) -> int:
        name = Path(url).name.lower()
        return next((i for i, token in enumerate(tokens) if token in name), len(tokens))

    ranked = sorted(urls, key=rank)  # stable: the list's order within a rank
    return next((url for url in ranked if _local_file(url, ckpts_dir)), ranked[0])


def files_of_definition(files_def: Mapping) -> list[HubFile]:
    """The hub files of one Wan2GP `query_model_files` entry {"repoId", "sourceFolderList", "fileList"}."""
    repo_id = files_def["repoId"]
    return [HubFile(repo_id, f"{folder}/{name}" if folder else name)
            for folder, names in zip(files_def["sourceFolderList"], files_def["fileList"])
            for name in names]


def model_sources(handler: type, base_model_type: str, model_def: Mapping, ckpts_dir: str | os.PathLike,
                  quantization: str | None = None) -> list[str]:
    """Everything a model needs, as paths or hub URLs, the main weights first: the definition's `URLs` entry
    that `choose_weights` picks (Wan2GP lists alternatives, e.g. bf16 and int8 files); then the handler's
    `query_model_files`."""
    urls = model_def.get("URLs")
    if isinstance(urls, str) or not urls:
        raise DownloadError(f"The model definition '{model_def.get('name', base_model_type)}' has no list of "
                            "weight URLs ('URLs').")
    main = choose_weights([str(url) for url in urls], ckpts_dir, quantization)
    extra = handler.query_model_files(lambda f: [Path(f).name], base_model_type, dict(model_def))
    return [main] + [f.url for files_def in ([extra] if isinstance(extra, Mapping) else extra or [])
                     for f in files_of_definition(files_def)]


def missing_model_files(handler: type, base_model_type: str, model_def: Mapping,
                        ckpts_dir: str | os.PathLike, quantization: str | None = None) -> list[str]:
    """The sources of `model_sources` that are not on disk yet."""
    return [src for src in model_sources(handler, base_model_type, model_def, ckpts_dir, quantization)
            if _local_file(src, ckpts_dir) is None]


def _missing_message(sources: list[str], ckpts_dir: Path, reason: str) -> str:
    count = f"{len(sources)} weight files are" if len(sources) > 1 else "A weight file is"
    lines = [f"{count} missing and cannot be downloaded: {reason}. Download and put them here:"]
    for src in sources:
        hub_file = parse_hf_url(src)
        name = hub_file.name if hub_file else Path(src).name
        lines.append(f"  {hub_file.url if hub_file else src}  ->  {ckpts_dir / name}")
    return "\n".join(lines)


def fetch_model_files(handler: type, base_model_type: str, model_def: Mapping, ckpts_dir: str | os.PathLike,
                      quantization: str | None = None,
                      before_download: Callable[[list[str]], None] | None = None) -> list[Path]:
    """Local paths of everything a model needs (`model_sources`), downloading what is missing (each download
    checked against the definition's `file_checks`); a DownloadError names every file that could not be had,
    at once. `before_download(missing)` runs once the downloads are about to start (e.g. a licence to accept:
    it may raise to stop them)."""
    check_ckpts_dir(ckpts_dir)
    ckpts_dir = Path(ckpts_dir)
    sources = model_sources(handler, base_model_type, model_def, ckpts_dir, quantization)
    missing = [src for src in sources if _local_file(src, ckpts_dir) is None]
    not_on_hub = [src for src in missing if parse_hf_url(src) is None]
    if not_on_hub:
        raise DownloadError(_missing_message(not_on_hub, ckpts_dir, "they are not hub URLs"))
    reason = hub_unreachable_reason() if missing else None
    if reason:
        raise DownloadError(_missing_message(missing, ckpts_dir, reason))
    if missing and before_download is not None:
        before_download(missing)
    checks = file_checks(model_def)
    failed = []
    for src in missing:
        hub_file = parse_hf_url(src)
        try:
            download_hub_file(hub_file, ckpts_dir, checks.get(hub_file.name))
        except DownloadError as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(src)
    if failed:
        raise DownloadError(_missing_message(failed, ckpts_dir, "the downloads failed (see above)"))
    return [_local_file(src, ckpts_dir) for src in sources]
