"""The Gradio web UI: settings on the left, live progress, results and the queue on the right.

Generate validates the settings and adds a task to the `JobQueue`; a timer polls the queue's snapshot to
draw progress (step, speed, ETA, a latent preview), the gallery and the queue. The setting controls are
built from the settings schema (shared/settings_schema.py): one control per setting, with the choices
and ranges validation uses for the chosen model (numbers are never clamped: a value out of range gets
validation's message). Values come from the model definition (defaults/*.json through the handler) or
from the last-used settings of that model, which are saved at each Generate and restored after a restart.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from shared import image_inputs
from shared.cli_args import port_in_use_message, server_port
from shared.images import latent_preview, read_image_metadata, read_image_settings
from shared.jobs import Job, JobQueue, Snapshot
from shared.licenses import LicenseNotAccepted
from shared.loras import list_loras
from shared.runtime import Runtime
from shared.settings import ModelRegistry, SettingsError, SettingsStore, resolve_task
from shared.settings_schema import Setting, SettingGroup, hires_on

POLL_SECONDS = 0.5
HIRES_SCALE_KEY = "hires_scale"  # its number box comes with an on / off toggle
HIRES_ON_SCALE = 1.5  # what turning the toggle on sets (the most the card advises per pass)
MAX_UI_LORAS = 8  # strength controls shown for the chosen LoRAs
SHUTDOWN_WAIT_S = 10.0  # on Ctrl-C, how long the running step may take to stop before the process exits

CSS = """
.app-header {display: flex; align-items: baseline; gap: 14px; padding: 6px 4px 2px}
.app-header h1 {margin: 0; font-size: 1.7em; font-weight: 700; letter-spacing: -0.02em}
.app-header span {opacity: 0.65}
#generate-btn {min-height: 52px; font-size: 1.1em}
#abort-btn {min-height: 52px; background: #e5484d; border-color: #e5484d; color: #fff; font-weight: 600}
#abort-btn:hover {background: #c9373c}
.seed-buttons {gap: 6px !important; justify-content: center}
.seed-buttons button {min-height: 0 !important; padding: 4px 8px !important}
.status {padding: 10px 14px; border-radius: 10px; background: var(--block-background-fill);
         border: 1px solid var(--border-color-primary); min-height: 62px}
.status .line {display: flex; justify-content: space-between; gap: 12px; font-weight: 600}
.status .sub {opacity: 0.7; font-size: 0.9em; margin-top: 2px; overflow: hidden; text-overflow: ellipsis;
              white-space: nowrap}
.status .bar {height: 8px; border-radius: 4px; background: var(--border-color-primary); margin-top: 8px;
              overflow: hidden}
.status .bar div {height: 100%; background: var(--color-accent); transition: width 0.3s}
.status.failed {border-color: #e5484d} .status.failed .line {color: #e5484d}
.status.failed .sub {white-space: pre-wrap; overflow: visible; opacity: 0.9}
.status.done .line {color: var(--color-accent)}
.status .pulse div {width: 35% !important; animation: slide 1.2s infinite ease-in-out}
@keyframes slide {0% {margin-left: -35%} 100% {margin-left: 100%}}
.queue-item {align-items: center !important; border-bottom: 1px solid var(--border-color-primary);
             padding: 2px 0}
.queue-item p {margin: 0 !important}
.queue-empty {opacity: 0.6}
.model-info {font-size: 0.85em; opacity: 0.7; padding: 0 6px; display: -webkit-box; -webkit-line-clamp: 2;
              -webkit-box-orient: vertical; overflow: hidden}
.model-info:hover {-webkit-line-clamp: unset}
.model-info p {margin: 2px 0 !important}
@media (max-width: 900px) {#main-row {flex-direction: column} #results-column {order: -1}}
"""


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def _job_label(job: Job) -> str:
    s = job.settings
    prompt = s["prompt"] if len(s["prompt"]) <= 70 else s["prompt"][:67] + "..."
    seed = "random" if s["seed"] == -1 else s["seed"]
    return (f"**#{job.id}** {html.escape(prompt) or '*(empty prompt)*'}  \n"
            f"<small>{s['resolution']} · {s['num_inference_steps']} steps · CFG {s['guidance_scale']:g} · "
            f"{s['sample_solver']} · seed {seed} · ×{s['batch_size']}</small>")


def status_html(snap: Snapshot) -> str:
    """The progress card: running step/ETA, or how the last task ended."""
    if snap.progress is not None:
        job, step = snap.progress.job, snap.progress.step
        prompt = html.escape(job.settings["prompt"])
        waiting = f" · {len(snap.queue)} queued" if snap.queue else ""
        if step is None:
            return (f"<div class='status running'><div class='line'><span>#{job.id} · {snap.progress.phase}</span>"
                    f"<span>{waiting.strip(' ·')}</span></div><div class='sub'>{prompt}</div>"
                    f"<div class='bar pulse'><div></div></div></div>")
        pct = 100 * step.step / max(step.total, 1)
        speed = step.elapsed / max(step.step, 1)
        detail = f" · {html.escape(step.detail)}" if step.detail else ""
        return (f"<div class='status running'><div class='line'><span>#{job.id} · Step {step.step}/{step.total}"
                f"{detail}</span><span>{speed:.2f} s/step · ETA {_fmt_time(step.eta or 0)}{waiting}</span></div>"
                f"<div class='sub'>{prompt}</div><div class='bar'><div style='width:{pct:.1f}%'></div></div></div>")
    last = snap.last
    if last is None:
        return ("<div class='status idle'><div class='line'><span>Ready</span></div>"
                "<div class='sub'>Write a prompt and press Generate. Clicks while busy are queued.</div></div>")
    title = {"done": f"✓ #{last.id} done · {last.message}", "aborted": f"■ #{last.id} aborted",
             "failed": f"✗ #{last.id} failed"}[last.status]
    if last.status == "done":
        where = Path(last.paths[0])
        detail = f"Saved {where}" if len(last.paths) == 1 else f"Saved {len(last.paths)} images in {where.parent}"
    else:
        detail = last.message if last.status == "failed" else last.settings["prompt"]
    detail = html.escape(detail)
    return f"<div class='status {last.status}'><div class='line'><span>{title}</span></div><div class='sub'>{detail}</div></div>"


def _number_value(value: Any) -> Any:
    return value if value is None or isinstance(value, (int, float)) else str(value)


class SettingControls:
    """One UI control per schema setting that has a `ui` kind. `inputs` lists the components in the order
    the event handlers receive their values; `to_settings` and `updates` translate both ways."""

    WIDE = ("textbox", "loras", "strengths", "image", "mask")

    def __init__(self, app: WebApp):
        self.app = app
        self.schema = app.registry.schema
        self.settings = [s for s in self.schema if s.ui is not None]
        self.components: dict[str, Any] = {}
        self.strengths: list[Any] = []
        self.seed_buttons: tuple[Any, Any] | None = None
        self.hires_toggle: Any = None

    # ------------------------------------------------------------------------------------ building

    def build_group(self, group: SettingGroup, model_type: str) -> None:
        row: list[Setting] = []

        def flush() -> None:
            if row:
                with gr.Row():
                    for setting in row:
                        self._make(setting, model_type)
                row.clear()

        for setting in group.settings:
            if setting.ui is None:
                continue
            if setting.ui in self.WIDE or setting.key in ("seed", HIRES_SCALE_KEY):
                flush()
                self._make(setting, model_type)
            else:
                row.append(setting)
                if len(row) == 2:
                    flush()
        flush()

    def _make(self, s: Setting, model_type: str) -> None:
        rule = self.app.registry.rule(model_type, s.key)
        common = {"label": s.label, "elem_id": s.key}
        if s.ui == "textbox":
            self.components[s.key] = gr.Textbox(lines=s.ui_lines, **common)
        elif s.ui == "number" and s.key == "seed":
            with gr.Row(equal_height=False):
                self.components[s.key] = gr.Number(info=rule.range_text(), step=s.ui_step, scale=4, **common)
                with gr.Column(scale=1, min_width=110, elem_classes="seed-buttons"):
                    self.seed_buttons = (gr.Button("Random", size="sm", elem_id="random-seed"),
                                         gr.Button("Last used", size="sm", elem_id="last-seed"))
        elif s.ui == "number" and s.key == HIRES_SCALE_KEY:
            with gr.Row(equal_height=True):
                self.hires_toggle = gr.Checkbox(label="Hires fix", value=False, scale=1, min_width=120,
                                                elem_id="hires-toggle", info="a second, upscaled pass")
                self.components[s.key] = gr.Number(info=rule.range_text(), step=s.ui_step, scale=3, **common)
        elif s.ui == "number":
            self.components[s.key] = gr.Number(info=rule.range_text(), step=s.ui_step, **common)
        elif s.ui in ("dropdown", "resolution"):
            self.components[s.key] = gr.Dropdown(allow_custom_value=s.ui == "resolution", **common)
        elif s.ui == "image":
            self.components[s.key] = gr.Image(type="filepath", sources=["upload", "clipboard"], height=200,
                                              image_mode=None, **common)
        elif s.ui == "mask":  # painted with a white brush on the source image (the "image" setting before it)
            self.components[s.key] = gr.ImageEditor(
                type="filepath", image_mode="RGBA", sources=[], layers=False, transforms=(), format="png",
                brush=gr.Brush(colors=["#FFFFFF"], color_mode="fixed", default_size="auto"), eraser=gr.Eraser(),
                height=360, **common)
        elif s.ui == "loras":
            self.components[s.key] = gr.Dropdown(multiselect=True, max_choices=MAX_UI_LORAS, **common)
        elif s.ui == "strengths":
            with gr.Row(elem_id=s.key):
                self.strengths = [gr.Number(value=1.0, step=0.05, visible=False, min_width=140,
                                            elem_classes="lora-strength") for _ in range(MAX_UI_LORAS)]

    @property
    def inputs(self) -> list[Any]:
        return [c for s in self.settings
                for c in (self.strengths if s.ui == "strengths" else [self.components[s.key]])]

    # --------------------------------------------------------------------------- values both ways

    def to_settings(self, values: list[Any]) -> dict[str, Any]:
        """The settings the controls hold (raw: validation types and checks them)."""
        it = iter(values)
        settings: dict[str, Any] = {}
        for s in self.settings:
            if s.ui == "strengths":
                strengths = [next(it) for _ in self.strengths]
                active = next((settings[o.key] for o in self.settings if o.ui == "loras"), None) or []
                settings[s.key] = strengths[:len(active)]
            elif s.ui == "image":
                settings[s.key] = self.app.inputs.keep(next(it))
            elif s.ui == "mask":
                source = next((settings[o.key] for o in self.settings if o.ui == "image"), None)
                settings[s.key] = self.app.inputs.painted_mask(next(it), source)
            else:
                settings[s.key] = next(it)
        return settings

    def updates(self, model_type: str, settings: dict[str, Any]) -> list[Any]:
        """gr.update()s that show `settings` (and the model's choices and ranges) in `inputs` order."""
        out: list[Any] = []
        for s in self.settings:
            rule = self.app.registry.rule(model_type, s.key)
            value = settings.get(s.key)
            if s.ui == "number":
                out.append(gr.update(value=_number_value(value), info=rule.range_text()))
            elif s.ui == "dropdown":
                choices = [list(c) for c in rule.choices] or [[str(value), value]]
                known = [c[1] for c in choices]
                out.append(gr.update(choices=choices, value=value if value in known else known[0]))
            elif s.ui == "resolution":
                presets = [list(p) for p in rule.presets]
                if str(value) not in [p[1] for p in presets]:
                    presets.insert(0, [str(value), str(value)])
                out.append(gr.update(choices=presets, value=str(value)))
            elif s.ui == "loras":
                files = list_loras(self.app.runtime.lora_dir(model_type))
                out.append(gr.update(choices=files, value=[n for n in value or [] if n in files][:MAX_UI_LORAS]))
            elif s.ui == "strengths":
                out += self.strength_updates(settings)
            elif s.ui == "image":
                out.append(self.app.inputs.shown(value))
            elif s.ui == "mask":
                source = next((settings.get(o.key) for o in self.settings if o.ui == "image"), None)
                out.append(self.app.inputs.editor_value(source, value))
            else:
                out.append(value if value is not None else "")
        return out

    def strength_updates(self, settings: dict[str, Any]) -> list[Any]:
        """Each chosen LoRA's own strength box (labelled with its name); the others hidden."""
        loras_key = next(s.key for s in self.settings if s.ui == "loras")
        strengths_key = next(s.key for s in self.settings if s.ui == "strengths")
        active = list(settings.get(loras_key) or [])[:MAX_UI_LORAS]
        raw = settings.get(strengths_key) or []
        values = [float(v) for v in (raw.split() if isinstance(raw, str) else raw) if v is not None]
        values += [1.0] * (len(active) - len(values))
        return [gr.update(visible=True, label=f"{Path(active[i]).stem} strength", value=values[i]) if i < len(active)
                else gr.update(visible=False) for i in range(len(self.strengths))]

    def on_loras_change(self, active: list[str] | None, *strengths: Any) -> list[Any]:
        """Keep the strengths typed so far for LoRAs still chosen; a new LoRA starts at 1."""
        loras_key = next(s.key for s in self.settings if s.ui == "loras")
        strengths_key = next(s.key for s in self.settings if s.ui == "strengths")
        return self.strength_updates({loras_key: active or [], strengths_key: [
            s if isinstance(s, (int, float)) else 1.0 for s in strengths[:len(active or [])]]})


class UploadedInputs:
    """The source images and masks of the UI, kept in `<output folder>/inputs/` under their content's SHA-256
    (so the settings saved with an image name a file that stays; the same file is kept once).

    A visitor of a `--listen` UI must not name or probe server paths: a file setting only ever holds a
    file kept here, made from an upload or from one of this app's results (Gradio's upload folder or the
    output folder); file paths in restored settings are dropped unless they are files kept here."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir).resolve()
        self.folder = self.output_dir / "inputs"

    @staticmethod
    def _inside(path: Path, folder: Path) -> bool:
        try:
            return path.resolve().is_relative_to(folder.resolve())
        except (OSError, ValueError):
            return False

    def served(self, path: str | None) -> bool:
        """Whether `path` is a file this app shows: an upload, a result, or Gradio's copy of one."""
        return bool(path) and Path(path).is_file() and (
            self._inside(Path(path), Path(gradio_upload_folder())) or self._inside(Path(path), self.output_dir))

    def kept(self, path: str | None) -> bool:
        return bool(path) and self._inside(Path(path), self.folder) and Path(path).is_file()

    def _store(self, data: bytes, suffix: str) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"{hashlib.sha256(data).hexdigest()[:24]}{suffix}"
        if not target.is_file():
            tmp = target.with_name(f".{target.name}.part")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return str(target)

    def keep(self, path: str | None) -> str | None:
        """The kept copy of an uploaded image or of a result (the file's bytes, unchanged)."""
        if not path:
            return None
        if self.kept(path):
            return str(Path(path).resolve())
        source = Path(path)
        if not self.served(path):
            raise gr.Error("Only an uploaded image or one of the results can be a source image.",
                           print_exception=False)
        return self._store(source.read_bytes(), source.suffix.lower() or ".png")

    def painted_mask(self, editor: dict | None, source: str | None) -> str | None:
        """The mask painted in the editor (the brush strokes' opacity, 255 = repaint) at the source image's
        size, kept as a PNG; None when nothing is painted."""
        layers = [layer for layer in (editor or {}).get("layers") or [] if layer]
        if not source or not layers:
            return None
        alpha = None
        for layer in layers:
            with Image.open(layer) as im:
                a = np.asarray(im.convert("RGBA").getchannel("A"))
            alpha = a if alpha is None else np.maximum(alpha, a)
        if not alpha.any():
            return None
        mask = Image.fromarray(alpha)
        size = image_inputs.image_size(source)
        if mask.size != size:
            mask = mask.resize(size, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
        return self._store(buffer.getvalue(), ".png")

    def shown(self, path: str | None) -> str | None:
        return str(Path(path).resolve()) if self.kept(path) else None

    def editor_value(self, source: str | None, mask: str | None) -> dict | None:
        """The mask editor showing `source` with `mask` as its white brush layer (None without a source)."""
        source = self.shown(source)
        if source is None:
            return None
        layers = []
        if self.shown(mask):
            alpha = image_inputs.open_mask(mask).resize(image_inputs.image_size(source))
            layer = Image.new("RGBA", alpha.size, (255, 255, 255, 0))
            layer.putalpha(alpha)
            buffer = io.BytesIO()
            layer.save(buffer, format="PNG")
            layers = [self._store(buffer.getvalue(), ".png")]
        return {"background": source, "layers": layers, "composite": None}

    def only_kept(self, settings: dict[str, Any], schema) -> list[str]:
        """Drops from `settings` every file setting that is not a file kept here; says which."""
        dropped = []
        for setting in schema:
            value = settings.get(setting.key)
            if setting.type == "file" and value and not self.kept(value):
                settings[setting.key] = None
                dropped.append(setting.key)
        if not dropped:
            return []
        return [f"{', '.join(dropped)} not restored: only images uploaded here can be used; upload it again."]


def gradio_upload_folder() -> str:
    from gradio.utils import get_upload_folder

    return get_upload_folder()


class WebApp:
    """The UI's event handlers around one registry, runtime, queue and settings store."""

    def __init__(self, registry: ModelRegistry, runtime: Runtime, store: SettingsStore):
        self.registry, self.runtime, self.store = registry, runtime, store
        self.queue = JobQueue(runtime, preview=self._preview, log=runtime.log)
        self.controls: SettingControls | None = None
        self.first_model: str | None = registry.dit_model_type
        self.inputs = UploadedInputs(runtime.options.output_dir)

    def _preview(self, model_type: str, latent: Any):
        """A step's latents as an image, with the family's latent->RGB factors (None if it has none)."""
        entry = self.registry.entry(model_type)
        factors, bias = (entry.handler.get_rgb_factors(entry.base_model_type)
                         if hasattr(entry.handler, "get_rgb_factors") else (None, None))
        return None if factors is None else latent_preview(latent, factors, bias)

    # ----------------------------------------------------------------------------- settings <-> UI

    def initial_model(self) -> str:
        """--model (or the model --dit gave another DiT), else the last one used, else the first."""
        if self.first_model:
            return self.first_model
        last = self.store.last_model_type()
        return last if last in self.registry.model_types else self.registry.default_model_type

    def settings_for(self, model_type: str, restored: dict[str, Any] | None = None) -> dict[str, Any]:
        """The model's defaults, overlaid by its last-used settings (or by `restored` ones)."""
        settings = self.registry.factory_settings(model_type)
        overlay = restored if restored is not None else (self.store.load(model_type) or {})
        settings.update({k: v for k, v in overlay.items() if k in settings and k != "model_type"})
        self.inputs.only_kept(settings, self.registry.schema)
        return settings

    def field_updates(self, model_type: str, settings: dict[str, Any]) -> list[Any]:
        """The model dropdown, its description, then every setting control."""
        entry = self.registry.entry(model_type)
        return [gr.update(value=model_type), str(entry.definition.get("description", "")),
                *self.controls.updates(model_type, settings)]

    def on_load(self):
        model_type = self.initial_model()
        return self.field_updates(model_type, self.settings_for(model_type))

    def on_model_change(self, model_type: str):
        return self.field_updates(model_type, self.settings_for(model_type))

    def on_restore(self, path: str | None, current_model: str):
        """Settings from a dropped file. A file that holds none changes nothing and says why (a warning,
        not an error, so no field is left under an error overlay)."""
        untouched = [gr.skip()] * (len(self.controls.inputs) + 2)
        if not path:
            return untouched
        try:
            restored, warnings = read_image_settings(path, self.registry.schema)
            warnings = warnings + self.inputs.only_kept(restored, self.registry.schema)
            model_type = restored.get("model_type")
            if model_type not in self.registry.model_types:
                model_type = current_model
            task, _ = resolve_task(self.registry, self.settings_for(model_type, restored), where="")
        except (SettingsError, ValueError) as e:
            message = str(e).replace(str(path), "This file").replace(Path(path).name, "this file")
            gr.Warning(f"No settings restored: {message}")
            return untouched
        gr.Info(" ".join(["Settings restored from the image.", *(w[0].upper() + w[1:] + "." for w in warnings)]))
        return self.field_updates(model_type, task.settings())

    def on_drop(self, path: str | None, current_model: str):
        """`on_restore`, then the drop zone emptied for the next file."""
        return [*self.on_restore(path, current_model), None]

    # ------------------------------------------------------------------------------------- actions

    def on_generate(self, model_type: str, *values: Any) -> None:
        task_settings = self.controls.to_settings(list(values))
        try:
            task, warnings = resolve_task(self.registry, dict(task_settings, model_type=model_type), where="")
            notices = warnings + self.runtime.check(task)
        except LicenseNotAccepted as e:
            message = (f"This model's weights are under the {e.license.name}: read the notice under the model "
                       "picker and press “I accept the licence” to download them.")
            raise gr.Error(message, print_exception=False) from None
        except (SettingsError, ValueError, OSError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        for notice in notices:
            gr.Info(notice[0].upper() + notice[1:])
        self.store.save(model_type, task.settings())
        self.queue.submit(task)

    # ------------------------------------------------------------------------- licence, negative prompt

    def license_view(self, model_type: str):
        """The licence notice and its accept button, shown while the model's weights would be downloaded under
        a licence not accepted yet (once accepted, here or on the command line, never again)."""
        license = self.runtime.license_to_accept(model_type) if model_type in self.registry.model_types else None
        return gr.update(visible=license is not None), license.markdown() if license else ""

    def on_accept_license(self, model_type: str):
        license = self.runtime.license_to_accept(model_type)
        if license is not None:
            self.runtime.accept_license(license)
            gr.Info("Licence accepted: the weights are downloaded at the first Generate.")
        return self.license_view(model_type)

    def negative_prompt_state(self, model_type: str, guidance_scale: Any):
        """The negative prompt is greyed out where it is not used: at CFG 1 (no unconditional pass). A model
        whose definition says it goes without one (`no_negative_prompt`, e.g. Turbo) says so, but at a
        higher CFG the negative prompt is used, so it stays editable there."""
        definition = self.registry.entry(model_type).definition if model_type in self.registry.model_types else {}
        try:
            unused = float(guidance_scale) == 1.0
        except (TypeError, ValueError):
            unused = False
        if unused:
            return gr.update(interactive=False, info="not used at CFG 1")
        if definition.get("no_negative_prompt"):
            return gr.update(interactive=True, info="this model is made for CFG 1 without a negative prompt; "
                                                    "at this CFG it is used")
        return gr.update(interactive=True, info=None)

    def on_abort(self) -> None:
        if self.queue.abort():
            gr.Info("Aborting at the next step...")

    def on_select(self, evt: gr.SelectData) -> tuple[str, str | None]:
        path = (evt.value or {}).get("image", {}).get("path")
        if not path or not self.inputs.served(path):  # the event's path comes from the browser
            return "", None
        try:
            parameters = read_image_metadata(path)[1]
        except ValueError:
            parameters = None
        return parameters or "(this image carries no settings)", path

    def on_source_upload(self, path: str | None):
        """A new source image: kept, shown in the mask editor with no mask yet."""
        kept = self.inputs.keep(path)
        return kept, self.inputs.editor_value(kept, None)

    def on_use_as_input(self, path: str | None):
        """The selected result becomes the source image (its mask editor emptied)."""
        if not path or not self.inputs.served(path):
            gr.Warning("Click a result first, then use it as the source image.")
            return gr.skip(), gr.skip()
        gr.Info("The result is the source image now (Image input): set a denoising strength, paint a mask.")
        return self.on_source_upload(path)

    def refresh_loras(self, model_type: str):
        """The LoRA choices, re-read from the folder (files added meanwhile); the chosen ones are left alone,
        so a pick made while this answer travels is not undone."""
        return gr.update(choices=list_loras(self.runtime.lora_dir(model_type)))

    def last_seed(self, current: Any) -> Any:
        """The seed the last finished task used (its first image's), for the "Last used" button."""
        last = self.queue.snapshot().last
        return last.seed if last is not None and last.seed is not None else current

    # ---------------------------------------------------------------------------------- live view

    def on_tick(self, seen: dict[str, int]):
        snap = self.queue.snapshot()
        if snap.version == seen.get("version"):
            return [gr.skip()] * 7
        running = snap.progress is not None
        outputs = [dict(seen, version=snap.version), status_html(snap)]
        outputs.append(gr.update(value=snap.preview, visible=running and snap.preview is not None))
        if snap.results_version != seen.get("results"):
            outputs[0]["results"] = snap.results_version
            outputs += [[(str(r.path), _caption(r.settings)) for r in snap.results], "", None]
        else:
            outputs += [gr.skip()] * 3
        if snap.queue_version != seen.get("queue"):
            outputs[0]["queue"] = snap.queue_version
            outputs.append([(job.id, _job_label(job)) for job in snap.queue])
        else:
            outputs.append(gr.skip())
        last = snap.last
        if last is not None and last.status == "failed" and seen.get("failed") != last.id:
            outputs[0]["failed"] = last.id
            if seen.get("version") is not None:  # a fresh page does not replay old errors
                gr.Warning(f"Task #{last.id} failed: {last.message}")
        return outputs


def _caption(settings: dict[str, Any]) -> str:
    """A gallery caption that tells images apart: seed, size, steps, CFG, sampler."""
    return (f"seed {settings['seed']} · {settings['resolution']} · {settings['num_inference_steps']} steps · "
            f"CFG {settings['guidance_scale']:g} · {settings['sample_solver']}")


def _settings_panel(app: WebApp) -> dict[str, Any]:
    """The left column: model, the settings' controls by group, Generate/Abort, the image drop zone."""
    registry = app.registry
    model_type = app.initial_model()
    controls = app.controls = SettingControls(app)
    c: dict[str, Any] = {}
    c["model"] = gr.Dropdown([(registry.entry(t).name, t) for t in registry.model_types], value=model_type,
                             label="Model", interactive=True)
    c["model_info"] = gr.Markdown(elem_classes="model-info")
    with gr.Group(visible=False, elem_id="license-box") as c["license_box"]:
        c["license_text"] = gr.Markdown(elem_id="license-text")
        c["license_accept"] = gr.Button("I accept the licence", size="sm", elem_id="accept-license")
    for group in registry.schema.groups:
        if not any(s.ui for s in group.settings):
            continue
        if group.main:
            controls.build_group(group, model_type)
        else:
            with gr.Accordion(group.title, open=False):
                controls.build_group(group, model_type)
    with gr.Row():
        c["generate"] = gr.Button("Generate", variant="primary", elem_id="generate-btn", scale=3)
        c["abort"] = gr.Button("■ Abort", variant="stop", elem_id="abort-btn", scale=1)
    c["dropped"] = gr.File(label="Drop a generated image here to restore its settings", type="filepath",
                           height=110, elem_id="restore-image")
    return c


def _results_panel(app: WebApp, demo: gr.Blocks) -> dict[str, Any]:
    """The right column: progress, live preview, gallery with each image's settings, the queue."""
    c: dict[str, Any] = {}
    c["status"] = gr.HTML(status_html(app.queue.snapshot()), elem_id="status")
    c["preview"] = gr.Image(label="Live preview", visible=False, interactive=False, height=256,
                            buttons=["fullscreen"], elem_id="live-preview")
    c["gallery"] = gr.Gallery(label="Results", columns=4, height=520, object_fit="contain", elem_id="gallery",
                              interactive=False)
    c["details"] = gr.Textbox(label="Image settings (click a result)", lines=3, interactive=False,
                              buttons=["copy"], elem_id="image-details")
    c["selected"] = gr.State(None)
    with gr.Row():
        c["reuse"] = gr.Button("Use this image's settings", size="sm", elem_id="reuse-btn")
        c["use_input"] = gr.Button("Use as source image", size="sm", elem_id="use-input-btn")
    gr.Markdown("### Queue")
    c["queue_items"] = gr.State([])
    with gr.Column(elem_id="queue"):
        @gr.render(inputs=c["queue_items"], triggers=[c["queue_items"].change, demo.load])
        def draw_queue(items):
            if not items:
                gr.Markdown("Nothing waiting.", elem_classes="queue-empty")
                return
            for job_id, label in items:
                with gr.Row(elem_classes="queue-item", equal_height=True):
                    gr.Markdown(label, scale=8)
                    remove = gr.Button("✕", size="sm", scale=0, min_width=40, elem_classes="queue-remove")
                    remove.click(lambda j=job_id: app.queue.remove(j), None, None, show_progress="hidden")
        c["clear"] = gr.Button("Clear queue", size="sm")
    return c


def build_ui(app: WebApp) -> gr.Blocks:
    with gr.Blocks(title="AnimaGP", analytics_enabled=False) as demo:
        gr.HTML("<div class='app-header'><h1>AnimaGP</h1><span>Anima text-to-image, on your machine</span></div>")
        with gr.Row(equal_height=False, elem_id="main-row"):
            with gr.Column(scale=5, min_width=360, elem_id="settings-column"):
                left = _settings_panel(app)
            with gr.Column(scale=7, min_width=420, elem_id="results-column"):
                right = _results_panel(app, demo)
        controls = app.controls
        model, fields = left["model"], controls.inputs
        model_outputs = [model, left["model_info"], *fields]
        seen = gr.State({})
        live = [seen, right["status"], right["preview"], right["gallery"], right["details"], right["selected"],
                right["queue_items"]]
        gr.Timer(POLL_SECONDS).tick(app.on_tick, seen, live, show_progress="hidden")
        # the page is ready for input once its fields hold the stored settings (tests wait for the mark)
        demo.load(app.on_load, None, model_outputs).then(None, js="() => { document.body.dataset.ready = '1'; }")
        model.input(app.on_model_change, model, model_outputs)
        left["generate"].click(app.on_generate, [model, *fields], None, show_progress="hidden",
                               trigger_mode="multiple")  # clicks while busy queue up
        left["abort"].click(app.on_abort, None, None, show_progress="hidden")
        seed = controls.components["seed"]
        random_seed, last_seed = controls.seed_buttons
        random_seed.click(lambda: -1, None, seed, show_progress="hidden")
        last_seed.click(app.last_seed, seed, seed, show_progress="hidden")
        left["dropped"].upload(app.on_drop, [left["dropped"], model], [*model_outputs, left["dropped"]],
                               show_progress="hidden")
        loras = next(controls.components[s.key] for s in controls.settings if s.ui == "loras")
        loras.focus(app.refresh_loras, model, loras, show_progress="hidden")  # picks up new files
        loras.change(controls.on_loras_change, [loras, *controls.strengths], controls.strengths,
                     show_progress="hidden")
        _wire_license_and_negative_prompt(app, demo, left)
        right["clear"].click(app.queue.clear, None, None, show_progress="hidden")
        right["gallery"].select(app.on_select, None, [right["details"], right["selected"]], show_progress="hidden")
        right["reuse"].click(app.on_restore, [right["selected"], model], model_outputs, show_progress="hidden")
        _wire_image_inputs(app, right)
    return demo


def _wire_license_and_negative_prompt(app: WebApp, demo: gr.Blocks, left: dict[str, Any]) -> None:
    model, box, text = left["model"], left["license_box"], left["license_text"]
    demo.load(app.license_view, model, [box, text], show_progress="hidden")
    model.change(app.license_view, model, [box, text], show_progress="hidden")
    left["license_accept"].click(app.on_accept_license, model, [box, text], show_progress="hidden")
    components = app.controls.components
    if "negative_prompt" in components and "guidance_scale" in components:
        cfg = components["guidance_scale"]
        cfg.change(app.negative_prompt_state, [model, cfg], components["negative_prompt"], show_progress="hidden")


def _wire_image_inputs(app: WebApp, right: dict[str, Any]) -> None:
    """The source image feeds the mask editor; a result can become the source; the hires toggle."""
    controls = app.controls
    source = next((controls.components[s.key] for s in controls.settings if s.ui == "image"), None)
    editor = next((controls.components[s.key] for s in controls.settings if s.ui == "mask"), None)
    if source is not None and editor is not None:
        source.upload(app.on_source_upload, source, [source, editor], show_progress="hidden")
        source.clear(lambda: None, None, editor, show_progress="hidden")
        right["use_input"].click(app.on_use_as_input, right["selected"], [source, editor], show_progress="hidden")
    if controls.hires_toggle is not None:
        scale = controls.components[HIRES_SCALE_KEY]
        controls.hires_toggle.input(lambda on, value: (value if hires_on(value) else HIRES_ON_SCALE) if on else 1.0,
                                    [controls.hires_toggle, scale], scale, show_progress="hidden")
        scale.change(hires_on, scale, controls.hires_toggle, show_progress="hidden")


def launch(args: argparse.Namespace, registry: ModelRegistry, runtime: Runtime) -> None:
    """Serve the UI until Ctrl-C or SIGTERM (the KeyboardInterrupt goes on to `main`, which exits with 130).
    Binds 127.0.0.1 unless --listen; of the disk, only the output folder is served."""
    if not registry.model_types:
        raise ValueError("No model is available: defaults/ holds no definition a family handler supports.")
    port = server_port(args)
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    app = WebApp(registry, runtime, SettingsStore(args.settings))
    if args.model:
        app.first_model = registry.entry(args.model).model_type  # a clear error for an unknown one
    demo = build_ui(app)
    theme = gr.themes.Soft(primary_hue="pink", secondary_hue="violet", neutral_hue="slate")
    try:
        demo.queue(default_concurrency_limit=4).launch(
            server_name="0.0.0.0" if args.listen else "127.0.0.1", server_port=port, inbrowser=args.open_browser,
            allowed_paths=[str(output_dir)], blocked_paths=[str(Path(args.ckpts_dir).resolve())],
            theme=theme, css=CSS, ssr_mode=False, show_error=True, prevent_thread_lock=True, quiet=False,
        )
    except OSError as e:
        if "port" not in str(e).lower():
            raise
        raise OSError(port_in_use_message(port)) from None
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        stopped = app.queue.stop(SHUTDOWN_WAIT_S)
        demo.close()
        if not stopped:  # a step still runs on the worker: exiting normally would abort inside torch
            print("Interrupted.", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(130)
        raise
