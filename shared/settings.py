"""Model definitions and generation settings, Wan2GP style.

- A model definition is a `defaults/<model_type>.json` file: its `"model"` entry is the definition
  (`architecture` = the base model type that picks the family handler), every other top-level key is a
  default setting. As in Wan2GP, a user's `finetunes/<model_type>.json` is merged over the default of the
  same name property by property (its settings too), or adds a model of its own; a finetune that cannot be
  used is skipped with a warning (`ModelRegistry.warnings`), never a crash.
- A task's settings are, from lowest to highest priority: the schema's defaults (shared/settings_schema.py),
  the handler's `update_default_settings`, the JSON's settings, caller defaults (e.g. CLI flags), then the
  task itself. Keys no layer knows are reported back, not silently used.
- `validate_settings` checks every value against its rule and gives a typed `Task`, one clear message per
  mistake.
- `SettingsStore` keeps the last-used settings of each model in a folder (`<model_type>_settings.json`).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from shared import image_inputs
from shared.settings_schema import MAX_SEED, SETTINGS, Rule, Schema, SettingsError, file_sha256, parse_resolution

SETTINGS_VERSION = 2.74  # the Wan2GP settings version these keys follow (nothing to migrate)
_TASK_WRAPPER_KEYS = {"id", "params", "plugin_data"}  # Wan2GP queue entries wrap settings in "params"

__all__ = ["ModelEntry", "ModelRegistry", "SettingsError", "SettingsStore", "Task", "load_tasks_file",
           "parse_resolution", "resolve_task", "validate_settings", "write_json_atomic"]


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
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark, as Windows editors write, is fine
    except FileNotFoundError:
        raise SettingsError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise SettingsError(f"{what} {path} is a folder, not a file.") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{what} {path} is not UTF-8 text.") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SettingsError(f"{what} {path} is not valid JSON ({e}).") from None
    except RecursionError:
        raise SettingsError(f"{what} {path} is nested too deeply to be settings.") from None


class ModelRegistry:
    """The models the app offers: family handlers mapped by base type, plus the defaults/*.json files."""

    def __init__(self, handlers: Sequence[type], defaults_dirs: Sequence[str | os.PathLike],
                 schema: Schema = SETTINGS, finetunes_dirs: Sequence[str | os.PathLike] = ()):
        self.schema = schema
        self._handlers, self._families = _map_handlers(handlers)
        self._entries: dict[str, ModelEntry] = {}
        self.skipped: dict[str, str] = {}  # model_type -> why it is not offered
        self.warnings: list[str] = []  # finetunes that could not be used, for the user
        self.dit_model_type: str | None = None  # the model `use_dit` gave another DiT
        raw: dict[str, tuple[dict, dict, Path]] = {}  # model_type -> ("model" entry, settings, file)
        for folder in defaults_dirs:
            for path in sorted(Path(folder).glob("*.json")):
                data = _read_json(path, "Model definition")
                model = data.pop("model", None) if isinstance(data, dict) else None
                raw[path.stem] = (model, data, path)
        self._finetunes: set[Path] = set()
        for folder in finetunes_dirs:
            for path in sorted(Path(folder).glob("*.json")):
                self._merge_finetune(raw, path)
        for model_type, (model, settings, path) in raw.items():
            self._add(model_type, model, settings, path)
        for model_type in list(self._entries):
            self._reuse_urls(model_type)
        for model_type, (_, _, path) in raw.items():
            if model_type in self._entries and path in self._finetunes:
                self._check_finetune(model_type, path)

    def _merge_finetune(self, raw: dict[str, tuple[dict, dict, Path]], path: Path) -> None:
        try:
            data = _read_json(path, "Finetune definition")
        except SettingsError as e:
            self.warnings.append(f"{e} It is ignored.")
            return
        model = data.pop("model", None) if isinstance(data, dict) else None
        if not isinstance(model, dict):
            self.warnings.append(f"Finetune definition {path} has no \"model\" entry: it is ignored.")
            return
        self._finetunes.add(path)
        if path.stem in raw and isinstance(raw[path.stem][0], dict):
            base_model, base_settings, _ = raw[path.stem]
            raw[path.stem] = ({**base_model, **model}, {**base_settings, **data}, path)
        else:
            raw[path.stem] = (model, data, path)

    def _add(self, model_type: str, model: Any, settings: dict, path: Path) -> None:
        def skip(why: str) -> None:
            self.skipped[model_type] = why
            if path in self._finetunes:
                self.warnings.append(f"Finetune definition {path} is ignored: {why}.")

        if not isinstance(model, dict) or "architecture" not in model:
            return skip(f"{path} has no \"model\" entry with an \"architecture\"")
        base_type = model["architecture"]
        handler = self._handlers.get(base_type)
        if handler is None:
            return skip(f"no family handler supports architecture '{base_type}'")
        urls = model.get("URLs")
        if path in self._finetunes and not isinstance(urls, str) and not (
                isinstance(urls, list) and urls and all(isinstance(u, str) for u in urls)):
            return skip("its \"URLs\" must be a list of weight file URLs or paths (or a model type)")
        definition = dict(handler.query_model_def(base_type, model) or {})
        definition.update(model)  # JSON keys win over the handler's defaults
        if definition.get("visible", True) is False:
            self.skipped[model_type] = "marked invisible"
            return
        self._entries[model_type] = ModelEntry(model_type, base_type, handler, definition, settings, path)

    def _reuse_urls(self, model_type: str) -> None:
        """Wan2GP's `"URLs": "<other model type>"`: that model's weights."""
        entry = self._entries[model_type]
        other = entry.definition.get("URLs")
        if not isinstance(other, str):
            return
        source = self._entries.get(other)
        if source is None or isinstance(source.definition.get("URLs"), str):
            del self._entries[model_type]
            self.skipped[model_type] = f"its \"URLs\" names '{other}', which is no model with weight URLs"
            if entry.path in self._finetunes:
                self.warnings.append(f"Finetune definition {entry.path} is ignored: {self.skipped[model_type]}.")
            return
        checks = {**(source.definition.get("file_checks") or {}), **(entry.definition.get("file_checks") or {})}
        definition = {**entry.definition, "URLs": list(source.definition["URLs"]), "file_checks": checks}
        self._entries[model_type] = ModelEntry(model_type, entry.base_model_type, entry.handler, definition,
                                               entry.settings, entry.path)

    def _check_finetune(self, model_type: str, path: Path) -> None:
        """A finetune whose settings do not validate is dropped with the reason, at startup (its own values
        first: the handler's `fix_settings` would quietly replace e.g. an unknown sampler)."""
        entry = self._entries[model_type]
        try:
            for key, value in entry.settings.items():
                if key in self.schema:
                    self.schema[key].clean(value, self.schema[key].rule(entry.definition))
            validate_settings(entry, self.factory_settings(model_type), self.schema)
        except SettingsError as e:
            del self._entries[model_type]
            self.skipped[model_type] = f"its settings are invalid: {e}"
            self.warnings.append(f"Finetune definition {path} is ignored: its settings are invalid: {e}")

    def use_dit(self, model_type: str, dit: str | os.PathLike) -> None:
        """Make `model_type` generate with the DiT at `dit` (a `.safetensors` or `.gguf` file, or a
        diffusers-format folder) instead of its own weights; its other defaults stay."""
        path = Path(dit).expanduser()
        if not path.exists():
            raise SettingsError(f"--dit: no such file or folder: {dit}")
        if path.is_file() and path.suffix.lower() not in (".safetensors", ".gguf"):
            raise SettingsError(f"--dit {dit}: the DiT must be a .safetensors or .gguf file, or a diffusers-format "
                                "folder.")
        entry = self.entry(model_type)
        definition = {**entry.definition, "URLs": [str(path)], "name": f"{entry.name} with {path.name}"}
        self._entries[model_type] = ModelEntry(model_type, entry.base_model_type, entry.handler, definition,
                                               entry.settings, entry.path)
        self.dit_model_type = model_type

    @property
    def default_model_type(self) -> str:
        """The model used when none is named: the one `use_dit` changed, else the first offered."""
        return self.dit_model_type if self.dit_model_type in self._entries else self.model_types[0]

    def offered(self) -> dict[str, list[str]]:
        """What the models offer, for the command-line help: "model_type" and each family-supplied choice."""
        offered: dict[str, list[str]] = {"model_type": self.model_types}
        for setting in self.schema:
            if setting.choices_from:
                names = [str(v) for t in self.model_types for _, v in self.rule(t, setting.key).choices]
                offered[setting.key] = list(dict.fromkeys(names))
        return offered

    def architecture_model_type(self) -> str | None:
        """The first offered model named after its architecture (Wan2GP's parent model, e.g. `anima`)."""
        return next((t for t in self.model_types if t == self._entries[t].base_model_type), None)

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
        settings = self.schema.defaults()
        entry.handler.update_default_settings(entry.base_model_type, entry.definition, settings)
        settings.update(copy.deepcopy(entry.settings))
        if hasattr(entry.handler, "fix_settings"):
            entry.handler.fix_settings(entry.base_model_type, SETTINGS_VERSION, entry.definition, settings)
        settings["model_type"] = model_type
        return settings

    def rule(self, model_type: str, key: str) -> Rule:
        """What setting `key` accepts for this model (the UI and validation share it)."""
        return self.schema[key].rule(self.entry(model_type).definition)


# ------------------------------------------------------------------------------------------ validation


@dataclass(frozen=True)
class Task:
    """One validated generation: the model and every setting of the schema, each in its clean type.

    `task[key]` reads a setting; `settings()` is the plain dict (JSON, last-used settings, metadata)."""

    model_type: str
    values: Mapping[str, Any]
    schema: Schema = field(default=SETTINGS, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))

    def __getitem__(self, key: str) -> Any:
        return self.model_type if key == "model_type" else self.values[key]

    def settings(self) -> dict[str, Any]:
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in self.values.items()}
        return {"model_type": self.model_type, **plain}

    def replace(self, **changes: Any) -> Task:
        return Task(self.model_type, {**self.values, **changes}, self.schema)

    def lora_strengths(self) -> list[float]:
        """One strength per activated LoRA: `loras_multipliers` in order, 1.0 for the ones it leaves out."""
        values = [float(v) for v in self.values["loras_multipliers"].split()]
        return values + [1.0] * (len(self.values["activated_loras"]) - len(values))


def _check_task(clean: Mapping[str, Any]) -> None:
    """Rules that tie two settings together."""
    count, strengths = len(clean["activated_loras"]), len(clean["loras_multipliers"].split())
    if strengths > count:
        raise SettingsError(f"loras_multipliers has {strengths} values for {count} activated LoRA(s).")
    last_seed = clean["seed"] + clean["batch_size"] - 1
    if clean["seed"] != -1 and last_seed > MAX_SEED:
        raise SettingsError(f"seed {clean['seed']} with batch_size {clean['batch_size']} gives image "
                            f"{clean['batch_size']} the seed {last_seed}, above the maximum {MAX_SEED}: use a seed "
                            f"of at most {MAX_SEED - clean['batch_size'] + 1}.")


def validate_settings(entry: ModelEntry, settings: Mapping[str, Any], schema: Schema = SETTINGS,
                      notices: list[str] | None = None) -> Task:
    """The typed Task for `settings` (every schema key must be present), or a SettingsError saying what is
    wrong: each value is checked against the rule the schema and the model's definition give it. Notes on
    settings that will not be used are appended to `notices`."""
    clean = {s.key: s.clean(settings.get(s.key), s.rule(entry.definition)) for s in schema}
    _check_task(clean)
    notes = image_inputs.settle(clean)
    if notices is not None:
        notices.extend(notes)
    if hasattr(entry.handler, "validate_generative_settings"):
        plain = {k: list(v) if isinstance(v, tuple) else v for k, v in clean.items()}
        problem = entry.handler.validate_generative_settings(entry.model_type, entry.definition,
                                                             dict(plain, model_type=entry.model_type))
        if problem:
            raise SettingsError(str(problem))
    return Task(entry.model_type, clean, schema)


def _unwrap(task: Any, where: str) -> dict[str, Any]:
    if not isinstance(task, Mapping):
        raise SettingsError(f"{where}: a task must be a JSON object of settings, got {type(task).__name__}.")
    if "params" in task and set(task) <= _TASK_WRAPPER_KEYS:
        return _unwrap(task["params"], where)
    return dict(task)


def resolve_task(
    registry: ModelRegistry, task: Any, *, defaults: Mapping[str, Any] | None = None,
    model_type: str | None = None, where: str = "task",
) -> tuple[Task, list[str]]:
    """The validated Task for one set of settings, and warnings (unknown keys) to show the user.

    `defaults` (e.g. CLI flags) sit between the model's defaults and the task; `model_type` is used when
    neither the task nor `defaults` names one.
    """
    def located(message: Any) -> str:
        return f"{where}: {message}" if where else str(message)

    task = _unwrap(task, where or "task")
    task = _with_custom_settings(task, registry.schema)
    defaults = dict(defaults or {})
    chosen = task.get("model_type") or task.get("base_model_type") or defaults.get("model_type") or model_type
    if not chosen:
        raise SettingsError(located("settings must contain 'model_type'."))
    try:
        settings = registry.factory_settings(str(chosen))
    except SettingsError as e:
        raise SettingsError(located(e)) from None
    known = set(settings) | {"base_model_type", "custom_settings"} | registry.schema.extra_json_keys()
    unknown = sorted(k for k in task if k not in known)
    settings.update({k: v for k, v in defaults.items() if k in registry.schema})
    settings.update({k: v for k, v in task.items() if k in registry.schema})
    warnings = []
    try:
        _check_recorded_files(task, registry.schema, warnings)
        if "resolution" not in task and "resolution" not in defaults and settings.get("image_guide"):
            multiple = registry.schema["resolution"].rule(registry.entry(str(chosen)).definition).multiple
            settings["resolution"] = image_inputs.native_resolution(settings["image_guide"],
                                                                    settings.get("video_guide_outpainting"), multiple)
        clean = validate_settings(registry.entry(str(chosen)), settings, registry.schema, warnings)
    except (SettingsError, ValueError) as e:
        raise SettingsError(located(e)) from None
    warnings = [located(w) for w in warnings]
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        warnings.append(located(f"ignored unknown setting(s): {shown}"))
    return clean, warnings


def _with_custom_settings(task: dict[str, Any], schema: Schema) -> dict[str, Any]:
    """Upstream Wan2GP keeps a family's own settings in `custom_settings` ({id: value}); the ones that are
    settings here (the scheduler, CFG truncation, the hires fix) count as if given at the top level, which
    wins."""
    custom = task.get("custom_settings")
    if not isinstance(custom, Mapping):
        return task
    found: dict[str, Any] = {}
    for setting in schema:
        custom_id, factor = setting.upstream_custom or (setting.key, None)
        if custom_id not in custom:
            continue
        value = custom[custom_id]
        if factor is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = value * factor
        found[setting.key] = value
    return {**found, **task}


def _check_recorded_files(task: Mapping[str, Any], schema: Schema, warnings: list[str]) -> None:
    """A task re-made from an image's settings names its files with their SHA-256 (`<key>_sha256`): a file
    that is gone is a clear error, one that changed a warning."""
    for setting in schema:
        recorded, path = task.get(f"{setting.key}_sha256"), task.get(setting.key)
        if setting.type != "file" or not recorded or not path:
            continue
        if not Path(path).is_file():
            raise SettingsError(f"{setting.key}: {path} is missing; these settings were made from that file "
                                f"(SHA-256 {str(recorded)[:16]}...): put it back, or choose another file.")
        if file_sha256(path) != recorded:
            warnings.append(f"{setting.key} {path} has changed since these settings were made (its SHA-256 "
                            "differs), so the result will differ")


def load_tasks_file(path: str | os.PathLike) -> list[Any]:
    """The tasks of a `--process` settings JSON: one object or a list of them."""
    data = _read_json(Path(path), "Settings file")
    tasks = data if isinstance(data, list) else [data]
    if not tasks:
        raise SettingsError(f"Settings file {path} holds an empty list: nothing to generate.")
    return tasks


# ------------------------------------------------------------------------------------------ persistence


def new_file_mode() -> int:
    """The permissions a plain `open(path, "w")` would give a new file: 0o666 less the umask (mkstemp's
    files are 0o600 whatever the umask says)."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
        os.umask(mask)
    return 0o666 & ~mask


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False, allow_nan=False)
        os.chmod(tmp, new_file_mode())
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
