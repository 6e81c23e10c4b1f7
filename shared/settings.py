"""Model definitions and generation settings, Wan2GP style.

- A model definition is a `defaults/<model_type>.json` file: its `"model"` entry is the definition
  (`architecture` = the base model type that picks the family handler), every other top-level key is a
  default setting.
- A task's settings are, from lowest to highest priority: `BASE_SETTINGS`, the handler's
  `update_default_settings`, the JSON's settings, caller defaults (e.g. CLI flags), then the task itself.
  Keys no layer knows are reported back, not silently used.
- `validate_settings` turns user values into clean types, with one clear message per mistake.
- `SettingsStore` keeps the last-used settings of each model in a folder (`<model_type>_settings.json`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE_SETTINGS: dict[str, Any] = {
    "prompt": "",
    "negative_prompt": "",
    "resolution": "1024x1024",
    "num_inference_steps": 30,
    "guidance_scale": 4.0,
    "flow_shift": 3.0,
    "sample_solver": "",
    "seed": -1,
    "batch_size": 1,
    "activated_loras": [],
    "loras_multipliers": "",
}
SETTINGS_VERSION = 2.74  # the Wan2GP settings version these keys follow (nothing to migrate)
DEFAULT_RESOLUTIONS = ("1024x1024", "896x1152", "1152x896", "832x1216", "1216x832", "768x1344", "1344x768")
MAX_SIDE = 4096
MAX_STEPS = 1000
MAX_SEED = 2**32 - 1
_RESOLUTION = re.compile(r"^\s*(\d+)\s*[xX×*]\s*(\d+)\s*$")
_TASK_WRAPPER_KEYS = {"id", "params", "plugin_data"}  # Wan2GP queue entries wrap settings in "params"


class SettingsError(ValueError):
    """A setting a user gave is wrong; the message says which and how to fix it."""


@dataclass(frozen=True)
class ModelEntry:
    model_type: str
    base_model_type: str
    handler: type
    definition: dict[str, Any]
    settings: dict[str, Any]  # the JSON's top-level settings
    path: Path

    @property
    def name(self) -> str:
        return str(self.definition.get("name", self.model_type))


def _map_handlers(handlers: Sequence[type]) -> tuple[dict[str, type], dict[str, tuple[int, str]]]:
    by_type: dict[str, type] = {}
    families: dict[str, tuple[int, str]] = {}
    for handler in handlers:
        for base_type in handler.query_supported_types():
            if base_type in by_type:
                raise ValueError(f"Model type '{base_type}' is supported by two family handlers.")
            by_type[base_type] = handler
        families.update(handler.query_family_infos())
    return by_type, families


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{what} not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SettingsError(f"{what} {path} is not valid JSON ({e}).") from None


class ModelRegistry:
    """The models the app offers: family handlers mapped by base type, plus the defaults/*.json files."""

    def __init__(self, handlers: Sequence[type], defaults_dirs: Sequence[str | os.PathLike]):
        self._handlers, self._families = _map_handlers(handlers)
        self._entries: dict[str, ModelEntry] = {}
        self.skipped: dict[str, str] = {}  # model_type -> why it is not offered
        for folder in defaults_dirs:
            for path in sorted(Path(folder).glob("*.json")):
                self._add(path)

    def _add(self, path: Path) -> None:
        data = _read_json(path, "Model definition")
        model = data.pop("model", None) if isinstance(data, dict) else None
        if not isinstance(model, dict) or "architecture" not in model:
            self.skipped[path.stem] = f"{path} has no \"model\" entry with an \"architecture\""
            return
        base_type = model["architecture"]
        handler = self._handlers.get(base_type)
        if handler is None:
            self.skipped[path.stem] = f"no family handler supports architecture '{base_type}'"
            return
        definition = dict(handler.query_model_def(base_type, model) or {})
        definition.update(model)  # JSON keys win over the handler's defaults
        if definition.get("visible", True) is False:
            self.skipped[path.stem] = "marked invisible"
            return
        self._entries[path.stem] = ModelEntry(path.stem, base_type, handler, definition, data, path)

    @property
    def model_types(self) -> list[str]:
        """Offered model types, ordered by family (the handlers' sort order), then by name."""
        def order(model_type: str) -> tuple[int, str]:
            entry = self._entries[model_type]
            family = entry.definition.get("group") or entry.handler.query_model_family()
            return self._families.get(family, (1000, ""))[0], entry.name

        return sorted(self._entries, key=order)

    def entry(self, model_type: str) -> ModelEntry:
        if model_type not in self._entries:
            offered = ", ".join(self.model_types) or "none"
            why = f" ({self.skipped[model_type]})" if model_type in self.skipped else ""
            raise SettingsError(f"Unknown model_type '{model_type}'{why}; available: {offered}.")
        return self._entries[model_type]

    def factory_settings(self, model_type: str) -> dict[str, Any]:
        entry = self.entry(model_type)
        settings = copy.deepcopy(BASE_SETTINGS)
        entry.handler.update_default_settings(entry.base_model_type, entry.definition, settings)
        settings.update(copy.deepcopy(entry.settings))
        if hasattr(entry.handler, "fix_settings"):
            entry.handler.fix_settings(entry.base_model_type, SETTINGS_VERSION, entry.definition, settings)
        settings["model_type"] = model_type
        return settings

    def sampler_choices(self, model_type: str) -> list[tuple[str, str]]:
        """(label, value) pairs; empty when the model does not restrict samplers."""
        return sampler_choices(self.entry(model_type).definition)

    def resolution_choices(self, model_type: str) -> list[tuple[str, str]]:
        """(label, "WxH") presets: the definition's `resolutions`, else common ~1 MP sizes."""
        presets = self.entry(model_type).definition.get("resolutions") or DEFAULT_RESOLUTIONS
        return [(str(p[0]), str(p[1])) if isinstance(p, (list, tuple)) else (str(p), str(p)) for p in presets]


# ------------------------------------------------------------------------------------------ validation


def sampler_choices(definition: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(str(label), str(value)) for label, value in definition.get("sample_solvers", [])]


def _as_int(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SettingsError(f"{key} must be a whole number, got {value!r}.")
    try:
        number = float(value)
        if not number.is_integer():
            raise ValueError
    except ValueError:
        raise SettingsError(f"{key} must be a whole number, got {value!r}.") from None
    if not low <= number <= high:
        raise SettingsError(f"{key} must be between {low} and {high}, got {int(number)}.")
    return int(number)


def _as_float(key: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{key} must be a number, got {value!r}.") from None
    if not (low < number if low_open else low <= number) or number > high or number != number:
        bound = f"above {low:g}" if low_open else f"at least {low:g}"
        raise SettingsError(f"{key} must be {bound} and at most {high:g}, got {value!r}.")
    return number


def parse_resolution(value: Any, block: int = 16) -> tuple[int, int]:
    """'WxH' -> (width, height), both multiples of `block` and at most `MAX_SIDE`."""
    match = _RESOLUTION.match(str(value))
    if not match:
        raise SettingsError(f"resolution must look like '1024x1024' (width x height), got {value!r}.")
    width, height = int(match.group(1)), int(match.group(2))
    if max(width, height) > MAX_SIDE:
        raise SettingsError(f"resolution {width}x{height} is too large: each side must be at most {MAX_SIDE} pixels.")
    if width < block or height < block or width % block or height % block:
        near = [max(block, round(v / block) * block) for v in (width, height)]
        raise SettingsError(
            f"resolution {width}x{height}: width and height must be multiples of {block} "
            f"(nearest: {near[0]}x{near[1]})."
        )
    return width, height


def lora_multipliers(settings: Mapping[str, Any]) -> list[float]:
    """One strength per activated LoRA (Wan2GP: space-separated numbers; a list works too), 1.0 if missing."""
    raw = settings.get("loras_multipliers") or []
    items = raw.split() if isinstance(raw, str) else list(raw)
    try:
        values = [float(v) for v in items]
    except (TypeError, ValueError):
        raise SettingsError(f"loras_multipliers must be numbers separated by spaces, got {raw!r}.") from None
    count = len(settings.get("activated_loras") or [])
    if len(values) > count:
        raise SettingsError(f"loras_multipliers has {len(values)} values for {count} activated LoRA(s).")
    return values + [1.0] * (count - len(values))


def _text(key: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SettingsError(f"{key} must be text, got {value!r}.")
    return value


def _lora_names(value: Any) -> list[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise SettingsError(f"activated_loras must be a list of LoRA file names, got {value!r}.")
    return list(names)


def validate_settings(entry: ModelEntry, settings: Mapping[str, Any]) -> dict[str, Any]:
    """A clean copy of `settings` (types fixed, ranges checked), or a SettingsError saying what is wrong."""
    clean = dict(settings)
    definition = entry.definition
    clean["prompt"] = _text("prompt", settings.get("prompt"))
    clean["negative_prompt"] = _text("negative_prompt", settings.get("negative_prompt"))
    width, height = parse_resolution(settings.get("resolution"), int(definition.get("vae_block_size", 16)))
    clean["resolution"] = f"{width}x{height}"
    clean["num_inference_steps"] = _as_int("num_inference_steps", settings.get("num_inference_steps"), 1, MAX_STEPS)
    clean["guidance_scale"] = _as_float("guidance_scale", settings.get("guidance_scale"), 0.0, 100.0)
    clean["flow_shift"] = _as_float("flow_shift", settings.get("flow_shift"), 0.0, 100.0, low_open=True)
    clean["seed"] = _as_int("seed", settings.get("seed"), -1, MAX_SEED)
    max_batch = int(definition.get("image_batch_size_max", 16))
    clean["batch_size"] = _as_int("batch_size", settings.get("batch_size"), 1, max_batch)
    solver = _text("sample_solver", settings.get("sample_solver"))
    solver = definition.get("sample_solver_aliases", {}).get(solver, solver)  # e.g. "euler_a"
    samplers = [value for _, value in sampler_choices(definition)]
    if samplers and solver not in samplers:
        raise SettingsError(f"Unknown sampler '{solver}': choose one of {', '.join(samplers)}.")
    clean["sample_solver"] = solver
    clean["activated_loras"] = _lora_names(settings.get("activated_loras") or [])
    clean["loras_multipliers"] = " ".join(f"{m:g}" for m in lora_multipliers(clean))
    if hasattr(entry.handler, "validate_generative_settings"):
        problem = entry.handler.validate_generative_settings(entry.model_type, definition, clean)
        if problem:
            raise SettingsError(str(problem))
    return clean


def _unwrap(task: Any, where: str) -> dict[str, Any]:
    if not isinstance(task, Mapping):
        raise SettingsError(f"{where}: a task must be a JSON object of settings, got {type(task).__name__}.")
    if "params" in task and set(task) <= _TASK_WRAPPER_KEYS:
        return _unwrap(task["params"], where)
    return dict(task)


def resolve_task(
    registry: ModelRegistry, task: Any, *, defaults: Mapping[str, Any] | None = None,
    model_type: str | None = None, where: str = "task",
) -> tuple[dict[str, Any], list[str]]:
    """Complete, validated settings for one task, and warnings (unknown keys) to show the user.

    `defaults` (e.g. CLI flags) sit between the model's defaults and the task; `model_type` is used when
    neither the task nor `defaults` names one.
    """
    def located(message: Any) -> str:
        return f"{where}: {message}" if where else str(message)

    task = _unwrap(task, where or "task")
    defaults = dict(defaults or {})
    chosen = task.get("model_type") or task.get("base_model_type") or defaults.get("model_type") or model_type
    if not chosen:
        raise SettingsError(located("settings must contain 'model_type'."))
    try:
        settings = registry.factory_settings(str(chosen))
    except SettingsError as e:
        raise SettingsError(located(e)) from None
    known = set(settings) | {"base_model_type"}
    unknown = sorted(k for k in task if k not in known)
    settings.update({k: v for k, v in defaults.items() if k in known})
    settings.update({k: v for k, v in task.items() if k in known and k != "base_model_type"})
    settings["model_type"] = str(chosen)
    try:
        clean = validate_settings(registry.entry(str(chosen)), settings)
    except SettingsError as e:
        raise SettingsError(located(e)) from None
    warnings = []
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        warnings.append(located(f"ignored unknown setting(s): {shown}"))
    return clean, warnings


def load_tasks_file(path: str | os.PathLike) -> list[Any]:
    """The tasks of a `--process` settings JSON: one object or a list of them."""
    data = _read_json(Path(path), "Settings file")
    tasks = data if isinstance(data, list) else [data]
    if not tasks:
        raise SettingsError(f"Settings file {path} holds an empty list: nothing to generate.")
    return tasks


# ------------------------------------------------------------------------------------------ persistence


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


class SettingsStore:
    """Last-used settings per model, and the last model used, in a folder (Wan2GP's `settings/`)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def _path(self, model_type: str) -> Path:
        return self.folder / f"{model_type}_settings.json"

    def load(self, model_type: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._path(model_type).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def save(self, model_type: str, settings: Mapping[str, Any]) -> None:
        write_json_atomic(self._path(model_type), dict(settings))
        write_json_atomic(self.folder / "last_model.json", {"model_type": model_type})

    def last_model_type(self) -> str | None:
        try:
            return json.loads((self.folder / "last_model.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            return None
