"""The Gradio web UI: settings on the left, live progress, results and the queue on the right.

Generate validates the settings and adds a task to the `JobQueue`; a timer polls the queue's snapshot to
draw progress (step, speed, ETA, a latent preview), the gallery and the queue. Every setting shown comes
from the model definition (defaults/*.json through the handler) or from the last-used settings of that
model, which are saved at each Generate and restored after a restart.
"""

from __future__ import annotations

import argparse
import html
import os
import time
from pathlib import Path
from typing import Any

import gradio as gr

from shared.cli_args import DEFAULT_PORT
from shared.images import latent_preview, read_image_metadata, read_image_settings
from shared.jobs import Job, JobQueue, Snapshot
from shared.loras import list_loras
from shared.runtime import Runtime
from shared.settings import ModelRegistry, SettingsError, SettingsStore, resolve_task

# settings key of each input component, in the order the event handlers receive them
FIELDS = ("prompt", "negative_prompt", "resolution", "num_inference_steps", "guidance_scale", "flow_shift",
          "sample_solver", "seed", "batch_size", "activated_loras", "loras_multipliers")
POLL_SECONDS = 0.5

CSS = """
.app-header {display: flex; align-items: baseline; gap: 14px; padding: 6px 4px 2px}
.app-header h1 {margin: 0; font-size: 1.7em; font-weight: 700; letter-spacing: -0.02em}
.app-header span {opacity: 0.65}
#generate-btn {min-height: 52px; font-size: 1.1em}
.status {padding: 10px 14px; border-radius: 10px; background: var(--block-background-fill);
         border: 1px solid var(--border-color-primary); min-height: 62px}
.status .line {display: flex; justify-content: space-between; gap: 12px; font-weight: 600}
.status .sub {opacity: 0.7; font-size: 0.9em; margin-top: 2px; overflow: hidden; text-overflow: ellipsis;
              white-space: nowrap}
.status .bar {height: 8px; border-radius: 4px; background: var(--border-color-primary); margin-top: 8px;
              overflow: hidden}
.status .bar div {height: 100%; background: var(--color-accent); transition: width 0.3s}
.status.failed {border-color: #e5484d} .status.failed .line {color: #e5484d}
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
        return (f"<div class='status running'><div class='line'><span>#{job.id} · Step {step.step}/{step.total}"
                f"</span><span>{speed:.2f} s/step · ETA {_fmt_time(step.eta or 0)}{waiting}</span></div>"
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


class WebApp:
    """The UI's event handlers around one registry, runtime, queue and settings store."""

    def __init__(self, registry: ModelRegistry, runtime: Runtime, store: SettingsStore):
        self.registry, self.runtime, self.store = registry, runtime, store
        self.queue = JobQueue(runtime, preview=self._preview, log=runtime.log)

    def _preview(self, model_type: str, latent: Any):
        """A step's latents as an image, with the family's latent->RGB factors (None if it has none)."""
        entry = self.registry.entry(model_type)
        factors, bias = (entry.handler.get_rgb_factors(entry.base_model_type)
                         if hasattr(entry.handler, "get_rgb_factors") else (None, None))
        return None if factors is None else latent_preview(latent, factors, bias)

    # ----------------------------------------------------------------------------- settings <-> UI

    def initial_model(self) -> str:
        last = self.store.last_model_type()
        return last if last in self.registry.model_types else self.registry.model_types[0]

    def settings_for(self, model_type: str, restored: dict[str, Any] | None = None) -> dict[str, Any]:
        """The model's defaults, overlaid by its last-used settings (or by `restored` ones)."""
        settings = self.registry.factory_settings(model_type)
        overlay = restored if restored is not None else (self.store.load(model_type) or {})
        settings.update({k: v for k, v in overlay.items() if k in settings and k != "model_type"})
        return settings

    def field_updates(self, model_type: str, settings: dict[str, Any]) -> list[Any]:
        """Values (and model-specific choices) for the model dropdown, its description and every FIELDS
        component."""
        entry = self.registry.entry(model_type)
        presets = self.registry.resolution_choices(model_type)
        resolution = str(settings["resolution"])
        if resolution not in [value for _, value in presets]:
            presets = [(resolution, resolution), *presets]
        samplers = self.registry.sampler_choices(model_type) or [(settings["sample_solver"],) * 2]
        sampler_values = [v for _, v in samplers]
        sampler = settings["sample_solver"] if settings["sample_solver"] in sampler_values else sampler_values[0]
        loras = list_loras(self.runtime.lora_dir(model_type))
        active = [name for name in settings.get("activated_loras") or [] if name in loras]
        max_batch = int(entry.definition.get("image_batch_size_max", 16))
        steps = int(settings["num_inference_steps"])
        return [
            gr.update(value=model_type), str(entry.definition.get("description", "")),
            settings["prompt"], settings["negative_prompt"],
            gr.update(choices=presets, value=resolution),
            gr.update(value=steps, maximum=max(100, steps)),
            float(settings["guidance_scale"]), float(settings["flow_shift"]),
            gr.update(choices=samplers, value=sampler),
            int(settings["seed"]),
            gr.update(value=min(int(settings["batch_size"]), max_batch), maximum=max_batch),
            gr.update(choices=loras, value=active),
            str(settings.get("loras_multipliers") or ""),
        ]

    def on_load(self):
        model_type = self.initial_model()
        return self.field_updates(model_type, self.settings_for(model_type))

    def on_model_change(self, model_type: str):
        return self.field_updates(model_type, self.settings_for(model_type))

    def on_restore(self, path: str | None, current_model: str):
        if not path:
            return [gr.skip()] * (len(FIELDS) + 2)
        try:
            restored = read_image_settings(path)
        except ValueError as e:
            raise gr.Error(str(e).replace(str(path), "This file"), print_exception=False) from None
        model_type = restored.get("model_type")
        if model_type not in self.registry.model_types:
            model_type = current_model
        settings = self.settings_for(model_type, restored)
        samplers = [value for _, value in self.registry.sampler_choices(model_type)]
        note = ""
        if samplers and settings["sample_solver"] not in samplers:  # e.g. an A1111 image's "Euler a"
            note = f" Its sampler '{settings['sample_solver']}' is not available here; using {samplers[0]}."
            settings["sample_solver"] = samplers[0]
        try:
            clean, _ = resolve_task(self.registry, settings, where="")
        except SettingsError as e:
            raise gr.Error(f"The settings in this image cannot be used here: {e}", print_exception=False) from None
        gr.Info("Settings restored from the image." + note)
        return self.field_updates(model_type, clean)

    # ------------------------------------------------------------------------------------- actions

    def on_generate(self, model_type: str, *values: Any) -> None:
        task = dict(zip(FIELDS, values), model_type=model_type)
        try:
            settings, _ = resolve_task(self.registry, task, where="")
        except SettingsError as e:
            raise gr.Error(str(e), print_exception=False) from None
        self.store.save(model_type, settings)
        self.queue.submit(settings)

    def on_abort(self) -> None:
        if self.queue.abort():
            gr.Info("Aborting at the next step...")

    def on_select(self, evt: gr.SelectData) -> tuple[str, str | None]:
        path = (evt.value or {}).get("image", {}).get("path")
        if not path:
            return "", None
        try:
            parameters = read_image_metadata(path)[1]
        except ValueError:
            parameters = None
        return parameters or "(this image carries no settings)", path

    def refresh_loras(self, model_type: str, active: list[str] | None):
        return gr.update(choices=list_loras(self.runtime.lora_dir(model_type)), value=active or [])

    def last_seed(self, current: int) -> int:
        """The seed the last finished task used (its first image's), for the "Last used" button."""
        last = self.queue.snapshot().last
        return last.seed if last is not None and last.seed is not None else current

    # ---------------------------------------------------------------------------------- live view

    def on_tick(self, seen: dict[str, int]):
        snap = self.queue.snapshot()
        if snap.version == seen.get("version"):
            return [gr.skip()] * 5
        running = snap.progress is not None
        outputs = [dict(seen, version=snap.version), status_html(snap)]
        outputs.append(gr.update(value=snap.preview, visible=running and snap.preview is not None))
        if snap.results_version != seen.get("results"):
            outputs[0]["results"] = snap.results_version
            outputs.append([(str(r.path), f"seed {r.seed}") for r in snap.results])
        else:
            outputs.append(gr.skip())
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


def _settings_panel(app: WebApp) -> dict[str, Any]:
    """The left column: model, prompts, sampling settings, Generate/Abort, the image drop zone."""
    registry = app.registry
    c: dict[str, Any] = {}
    c["model"] = gr.Dropdown([(registry.entry(t).name, t) for t in registry.model_types], value=app.initial_model(),
                             label="Model", interactive=True)
    c["model_info"] = gr.Markdown(elem_classes="model-info")
    c["prompt"] = gr.Textbox(label="Prompt", lines=4, elem_id="prompt",
                             placeholder="masterpiece, best quality, score_7, safe, 1girl, ...")
    c["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2, elem_id="negative-prompt")
    with gr.Row():
        c["resolution"] = gr.Dropdown(label="Resolution (W x H)", allow_custom_value=True, elem_id="resolution",
                                      scale=2)
        c["batch_size"] = gr.Slider(1, 16, step=1, label="Batch size", elem_id="batch-size", scale=2)
    with gr.Row():
        c["num_inference_steps"] = gr.Slider(1, 100, step=1, label="Steps", elem_id="steps")
        c["guidance_scale"] = gr.Slider(0, 15, step=0.1, label="CFG scale", elem_id="cfg")
    with gr.Row():
        c["flow_shift"] = gr.Slider(0.1, 10, step=0.1, label="Shift", elem_id="shift")
        c["sample_solver"] = gr.Dropdown(label="Sampler", elem_id="sampler")
    with gr.Row(equal_height=True):
        c["seed"] = gr.Number(label="Seed (-1 = random)", precision=0, elem_id="seed", scale=4)
        c["random_seed"] = gr.Button("Random", size="sm", scale=1, min_width=70)
        c["reuse_seed"] = gr.Button("Last used", size="sm", scale=1, min_width=70)
    with gr.Accordion("LoRAs", open=False):
        c["activated_loras"] = gr.Dropdown(label="Active LoRAs", multiselect=True, elem_id="loras")
        c["loras_multipliers"] = gr.Textbox(label="Strengths (one per LoRA, space separated)", placeholder="1.0 0.8")
    with gr.Row():
        c["generate"] = gr.Button("Generate", variant="primary", elem_id="generate-btn", scale=3)
        c["abort"] = gr.Button("Abort", variant="stop", elem_id="abort-btn", scale=1)
    c["dropped"] = gr.Image(label="Drop a generated image here to restore its settings", type="filepath",
                            sources=["upload"], height=150, elem_id="restore-image")
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
    c["reuse"] = gr.Button("Use this image's settings", size="sm")
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
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=360):
                left = _settings_panel(app)
            with gr.Column(scale=7, min_width=420):
                right = _results_panel(app, demo)
        model, fields = left["model"], [left[key] for key in FIELDS]
        model_outputs = [model, left["model_info"], *fields]
        seen = gr.State({})
        live = [seen, right["status"], right["preview"], right["gallery"], right["queue_items"]]
        gr.Timer(POLL_SECONDS).tick(app.on_tick, seen, live, show_progress="hidden")
        # the page is ready for input once its fields hold the stored settings (tests wait for the mark)
        demo.load(app.on_load, None, model_outputs).then(None, js="() => { document.body.dataset.ready = '1'; }")
        model.input(app.on_model_change, model, model_outputs)
        left["generate"].click(app.on_generate, [model, *fields], None, show_progress="hidden",
                               trigger_mode="multiple")  # clicks while busy queue up
        left["abort"].click(app.on_abort, None, None, show_progress="hidden")
        left["random_seed"].click(lambda: -1, None, left["seed"], show_progress="hidden")
        left["reuse_seed"].click(app.last_seed, left["seed"], left["seed"], show_progress="hidden")
        left["dropped"].upload(app.on_restore, [left["dropped"], model], model_outputs)
        left["activated_loras"].focus(app.refresh_loras, [model, left["activated_loras"]], left["activated_loras"],
                                      show_progress="hidden")  # picks up files added meanwhile
        right["clear"].click(app.queue.clear, None, None, show_progress="hidden")
        right["gallery"].select(app.on_select, None, [right["details"], right["selected"]], show_progress="hidden")
        right["reuse"].click(app.on_restore, [right["selected"], model], model_outputs)
    return demo


def launch(args: argparse.Namespace, registry: ModelRegistry, runtime: Runtime) -> None:
    """Serve the UI until Ctrl-C (the KeyboardInterrupt goes on to `main`, which exits with 130).
    Binds 127.0.0.1 unless --listen; of the disk, only the output folder is served."""
    if not registry.model_types:
        raise ValueError("No model is available: defaults/ holds no definition a family handler supports.")
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    app = WebApp(registry, runtime, SettingsStore(args.settings))
    demo = build_ui(app)
    port = args.server_port or int(os.environ.get("SERVER_PORT", DEFAULT_PORT))
    theme = gr.themes.Soft(primary_hue="pink", secondary_hue="violet", neutral_hue="slate")
    demo.queue(default_concurrency_limit=4).launch(
        server_name="0.0.0.0" if args.listen else "127.0.0.1", server_port=port, inbrowser=args.open_browser,
        allowed_paths=[str(output_dir)], blocked_paths=[str(Path(args.ckpts_dir).resolve())],
        theme=theme, css=CSS, ssr_mode=False, show_error=True, prevent_thread_lock=True, quiet=False,
    )
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        demo.close()
        raise
