"""PackForcing Studio: the Gradio app (UI wiring only; the run logic is in packforcing/studio/, the page's
HTML and figures in packforcing/studio/view.py).

Run ``python app.py`` and open http://127.0.0.1:7860 (``GRADIO_SERVER_NAME`` /
``GRADIO_SERVER_PORT`` are respected). The limits a Space operator can set (maximum duration,
concurrent runs, queue size, allowed models, models directory, run-file retention) are environment
variables read by `packforcing.safety`.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls of our own making

# studio imports `spaces` before torch, as ZeroGPU requires.
from packforcing import safety, studio  # noqa: E402, I001

import html  # noqa: E402
import inspect  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402

import app_panels
import app_replay
from analysis.figures import compare_figure
from packforcing.studio import admission, http_guard  # Gradio's queue and HTTP edge on a public Space
from packforcing.studio.view import (  # the page's HTML and figures (no Gradio)
    CSS, IDLE, POLICY_NOTES, compare_frame, load_examples, model_note, progress_html, summary_frame, toast_text,
    update_html,
)
from packforcing.studio.models import model_description

THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="emerald")
LAUNCH_KWARGS = {"theme": THEME, "css": CSS}


def launch_kwargs() -> dict:
    """What ``demo.launch`` gets: the theme and the HTTP guard's settings (`http_guard.launch_kwargs`)."""
    return {**LAUNCH_KWARGS, **http_guard.launch_kwargs()}


# ---- handlers ----------------------------------------------------------------------------------
KNOBS = studio.knob_specs()
KNOB_NAMES = list(KNOBS)
SETTINGS = ["prompt", "seconds", "seed", "randomize_seed", "policy", "compressor", "model", "schedule",
            "prompt_switch", *KNOB_NAMES]
# the analysis controls travel with the settings, so live plots honour the chosen layer / unit
INPUTS = [*SETTINGS, "occ_layer", "occ_unit", "topk_layer", "rope_layer"]


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def _request_from(values) -> tuple[studio.RunRequest, dict]:
    args = dict(zip(INPUTS, values))
    options = {name: args[name] for name in KNOB_NAMES}
    try:
        req = studio.validate_request(args["prompt"], args["seconds"], args["seed"], args["policy"], options,
                                      args["compressor"], args["model"] or studio.DEFAULT_MODEL,
                                      randomize_seed=args["randomize_seed"], schedule=args["schedule"],
                                      prompt_switch=args["prompt_switch"])
        layers = studio.get_pipeline(req.model).transformer.config.num_layers
        args.update(studio.validate_view(args["occ_layer"], args["occ_unit"], args["topk_layer"], args["rope_layer"],
                                         layers))
    except studio.StudioError as err:
        raise gr.Error(toast_text(err), title="Invalid input") from None
    for text in [req.prompt, *(p for _, p in req.schedule)]:
        note = studio.prompt_warning(text, req.model)
        if note:
            gr.Warning(toast_text(note))
    return req, args


def _panels(tables, update, args, fps):
    """The analysis panels' values for the latest block of a run (`app_panels.render`)."""
    view = {"meta": update.meta, "thumbs": update.thumbnails}
    return app_panels.render(tables, view, None, args["occ_layer"], args["occ_unit"], args["topk_layer"],
                             args["rope_layer"], fps=fps)


def _generate(request: gr.Request, *values):
    """Generate a video; yields the preview, progress, analysis plots, and at the end the mp4 and trace."""
    req, args = _request_from(values)
    pipe = studio.get_pipeline(req.model)
    worker = studio.GenerationWorker(req)
    key = _session(request)
    studio.RUNS.register(key, worker)
    worker.start()
    panels_kept = (gr.skip(),) * (len(app_panels.OUTPUT_NAMES) - 2)
    try:
        yield (progress_html(0, f"Starting: {req.num_blocks} blocks ({req.label})…"), None, None, None, None,
               *panels_kept, None, None, req.seed)
        for update in worker.updates():
            if update.final:
                break
            if worker.backlog:  # the UI fell behind: stream the segment, redraw the panels next time
                yield (update_html(update), str(update.segment), *(gr.skip(),) * (4 + len(app_panels.OUTPUT_NAMES)))
                continue
            yield (update_html(update), str(update.segment), None, None, gr.skip(),
                   *_panels(update.tables, update, args, pipe.fps), gr.skip())
        if update.kind == "error":
            gr.Warning(toast_text(f"Generation failed: {update.message}"))
        elif update.stopped:
            gr.Info(f"Stopped after {update.blocks_done} of {update.total_blocks} blocks; the partial video is kept.")
        yield (update_html(update), gr.skip(), str(update.video) if update.video else None,
               [str(p) for p in update.trace_files] or None, summary_frame(update),
               *_panels(update.tables, update, args, pipe.fps), req.seed)
    finally:
        worker.stop()
        studio.RUNS.unregister(key, worker)
        http_guard.release_streams(request)


def _compare(request: gr.Request, *values):
    """Run the selected policies one after the other with the same prompt, seed and duration."""
    *settings, chosen = values
    req, _ = _request_from(settings)
    try:
        run = studio.CompareRun(req, chosen, options={req.policy: req.options})
    except studio.StudioError as err:
        raise gr.Error(toast_text(err), title="Invalid input") from None
    key = _session(request)
    studio.RUNS.register(key, run)
    names = studio.policy_names()
    slots = [gr.update(visible=p in run.policies, value=None, label=p) for p in names]
    yield (progress_html(0, f"Comparing {', '.join(run.policies)} ({req.seconds:g} s, seed {req.seed})…"),
           *slots, compare_figure(None), None, req.seed)
    latest: dict[str, studio.Update] = {}
    total = len(run.policies)
    try:
        for i, (policy, update) in run.indexed_updates():
            latest[policy] = update
            frac = (i + update.fraction) / total
            text = f"{policy} ({i + 1}/{total}): {update.progress_text()}"
            if not update.final:
                yield (progress_html(frac, "Generating… " + text), *(gr.skip(),) * len(names),
                       compare_figure(run.blocks_by_policy(latest)), gr.skip(), gr.skip())
                continue
            if update.kind == "error":
                gr.Warning(toast_text(f"{policy} failed: {update.message}"))
            slot = [gr.update(value=str(update.video), label=f"{policy}" + (" (stopped)" if update.stopped else ""))
                    if p == policy and update.video else gr.skip() for p in names]
            yield (progress_html(frac, text), *slot, compare_figure(run.blocks_by_policy(latest)),
                   compare_frame(run.results), gr.skip())
        stopped = any(u.stopped for u in run.results.values()) or len(run.results) < total
        text = ("Stopped: " if stopped else "Done: ") + ", ".join(
            f"{p} {u.blocks_done}/{u.total_blocks} blocks" for p, u in run.results.items())
        # plain values (the slots' visibility was set at the start): API clients get the mp4 paths
        final_slots = [str(run.results[p].video) if p in run.results and run.results[p].video else None
                       for p in names]
        yield (progress_html(len(run.results) / total, text, "pf-stopped" if stopped else ""), *final_slots,
               compare_figure(run.blocks_by_policy()), compare_frame(run.results), req.seed)
    finally:
        run.stop()
        studio.RUNS.unregister(key, run)


def _named(impl, names: list[str], name: str):
    """A generator handler with one named parameter per input, so the API reads
    ``client.predict(prompt=..., seconds=..., api_name="/generate")`` instead of ``param_0``.
    The names come from an explicit ``__signature__`` (Gradio reads it with `inspect.signature`)."""

    def handler(request: gr.Request, *values, **named):
        values = list(values) + [None] * (len(names) - len(values))  # None: the initial value, or automatic
        for i, key in enumerate(names):
            if key in named:
                values[i] = named[key]
        yield from impl(request, *values)

    request = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for n in names]
    handler.__signature__ = inspect.Signature([request, *params])
    handler.__name__ = handler.__qualname__ = name
    handler.__doc__, handler.__module__ = impl.__doc__, __name__
    return handler


generate = _named(_generate, INPUTS, "generate")
compare = _named(_compare, [*INPUTS, "policies"], "compare")


async def stop(request: gr.Request):
    """Stop this session's generations: a running one after the block in progress (the partial
    video is kept), one still waiting in the queue at once."""
    key = _session(request)
    running = studio.RUNS.stop(key)
    queued = await admission.stop_queued(request.request.app.get_blocks(), key)
    if running:
        gr.Info("Stopping after the current block…")
    elif queued:
        gr.Info("Stopped: the run had not started yet.")


async def on_unload(request: gr.Request):
    """The browser tab closed: stop that session's runs (a partial video stays in its run directory)
    and take its waiting ones out of the queue."""
    studio.RUNS.stop(_session(request))
    await admission.stop_queued(request.request.app.get_blocks(), _session(request))


def on_policy(policy):
    """Show the knobs of the chosen policy (with its defaults) and hide the others."""
    knobs = studio.policy_knobs(policy, _block_frames())
    knob_updates = [gr.update(visible=name in knobs, value=knobs.get(name)) if name in knobs
                    else gr.update(visible=False) for name in KNOB_NAMES]
    return (POLICY_NOTES.get(policy, ""), gr.update(visible=studio.policy_compresses(policy)),
            gr.update(visible=has_advanced(policy)), *knob_updates)


def _block_frames() -> int:
    """Latent frames per block of the default model: knob defaults and slider steps follow it."""
    return studio.get_pipeline(studio.DEFAULT_MODEL).block_frames


def has_advanced(policy) -> bool:
    return any(KNOBS[name].advanced for name in studio.policy_knobs(policy))


def _lock():
    return gr.update(interactive=False), gr.update(interactive=False)


def _unlock():
    return gr.update(interactive=True), gr.update(interactive=True)


# ---- layout ------------------------------------------------------------------------------------
def knob_component(spec: studio.KnobSpec, default, visible: bool):
    common = dict(label=spec.label, info=spec.info or None, visible=visible)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(default) if default is not None else False, **common)
    if spec.kind == "choice":
        return gr.Dropdown(list(spec.choices), value=default, **common)
    if spec.kind == "int" and spec.minimum is not None and spec.maximum is not None:
        return gr.Slider(spec.minimum, spec.maximum, value=default, step=spec.step or 1, **common)
    if spec.kind in ("int", "float"):
        return gr.Number(value=default, precision=0 if spec.kind == "int" else None, minimum=spec.minimum,
                         maximum=spec.maximum, **common)
    return gr.Textbox(value=default, **common)


def build_demo() -> gr.Blocks:
    pipe = studio.get_pipeline(studio.DEFAULT_MODEL)
    policies = studio.policy_names()
    default_policy = policies[0]
    default_knobs = studio.policy_knobs(default_policy, pipe.block_frames)
    every_knob = {}
    for p in policies:
        every_knob.update({k: v for k, v in studio.policy_knobs(p, pipe.block_frames).items() if k not in every_knob})
    specs = studio.knob_specs(pipe.block_frames)  # slider ranges and steps in whole blocks of this model
    layers = [("mean over layers", "mean")] + [(f"layer {i}", str(i)) for i in range(pipe.transformer.config.num_layers)]
    examples = load_examples()
    limit, shortest = studio.max_seconds(), studio.min_seconds()
    concurrency = safety.concurrency_limit()
    ttl = int(safety.run_ttl_s())

    # Gradio's own copies of the output files expire like the run directories do
    with gr.Blocks(title="PackForcing Studio", delete_cache=(min(3600, ttl), ttl)) as demo:
        gr.Markdown(
            "# PackForcing Studio\n"
            "Minute-long video from a model trained on 5-second clips, with a **bounded KV cache**: "
            "sink + compressed top-k mid blocks + recent (PackForcing, arXiv 2603.25730). Generate a video, "
            "watch it stream block by block, and see what the cache keeps and why.")
        gr.Markdown(f"Model: **{html.escape(pipe.name)}**, {pipe.width}×{pipe.height} at {pipe.fps} fps. "
                    + (model_note(pipe.name) or html.escape(model_description(studio.DEFAULT_MODEL))),
                    elem_classes="pf-note")
        with gr.Row():
            with gr.Column(scale=4, min_width=330):
                prompt = gr.Textbox(label="Prompt", lines=2, value=examples[0] if examples else "",
                                    placeholder="a red circle and a blue square bouncing over a dark grey background")
                if examples:
                    gr.Examples([[e] for e in examples], inputs=[prompt], label="Example prompts",
                                cache_examples=False, examples_per_page=6)
                with gr.Accordion("Prompt schedule: change the prompt mid-video", open=False):
                    schedule = gr.Dataframe(
                        value=[[None, ""]], headers=["seconds", "prompt"], datatype=["number", "str"], row_count=1,
                        column_count=2, interactive=True,
                        label="Later prompts (the prompt above plays from 0 s)", elem_id="pf-schedule")
                    prompt_switch = gr.Radio(
                        [("keep the cache", "keep"), ("re-cache under the new prompt", "recache")], value="keep",
                        label="At a switch", info="re-cache: the kept blocks and compressed mid blocks are "
                                                  "recomputed under the new prompt (LongLive's KV re-cache)")
                seconds = gr.Slider(shortest, limit, value=max(shortest, min(studio.MIN_SECONDS, limit)), step=1,
                                    label="Duration (seconds)", info=f"{shortest:g}–{limit:g} s")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="Seed", minimum=0)
                    randomize = gr.Checkbox(False, label="Random seed", info="draw a new seed each run")
                policy = gr.Dropdown(policies, value=default_policy, label="Cache policy")
                policy_note = gr.Markdown(POLICY_NOTES.get(default_policy, ""), elem_classes="pf-note")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary")
                    stop_btn = gr.Button("Stop", variant="stop")
                with gr.Accordion("Cache policy settings", open=True):
                    compressor = gr.Radio(list(studio.COMPRESSOR_MODES), value=pipe.compressor.mode,
                                          label="Compressor branch",
                                          info="lr: zero-shot (VAE re-encode), hr: learned conv, both: summed",
                                          visible=studio.policy_compresses(default_policy))
                    knob_by_name = {}
                    for name in KNOB_NAMES:
                        if not KNOBS[name].advanced:
                            knob_by_name[name] = knob_component(
                                specs[name], default_knobs.get(name, every_knob.get(name)), name in default_knobs)
                    with gr.Accordion("Advanced", open=False, visible=has_advanced(default_policy)) as advanced:
                        for name in KNOB_NAMES:
                            if KNOBS[name].advanced:
                                knob_by_name[name] = knob_component(
                                    specs[name], default_knobs.get(name, every_knob.get(name)),
                                    name in default_knobs)
                    knobs = [knob_by_name[name] for name in KNOB_NAMES]
                with gr.Accordion("Model", open=False):
                    model = gr.Dropdown(studio.model_choices(), value=studio.DEFAULT_MODEL, label="Model",
                                        allow_custom_value=safety.models_dir() is not None,
                                        info=studio.CHECKPOINT_NOTE)
            with gr.Column(scale=6):
                with gr.Tabs():
                    with gr.Tab("Generate"):
                        progress = gr.HTML(IDLE)
                        with gr.Row():
                            preview = gr.Video(label="Live preview (one segment per block)", streaming=True,
                                               autoplay=True, interactive=False, height=300)
                            video = gr.Video(label="Final video (mp4)", interactive=False, height=300,
                                             buttons=["download"])
                        trace_files = gr.File(label="Trace (Parquet / CSV)", file_count="multiple",
                                              interactive=False)
                        summary = gr.Dataframe(label="Run summary", interactive=False)
                    with gr.Tab("Compare"):
                        gr.Markdown("Runs each selected policy with the prompt, seed and duration on the left, one "
                                    "after the other (the policy chosen on the left keeps its settings, the others "
                                    "use their defaults).", elem_classes="pf-note")
                        compare_policies = gr.CheckboxGroup(policies, value=policies[: min(3, len(policies))],
                                                            label="Policies to compare")
                        with gr.Row():
                            compare_btn = gr.Button("Compare", variant="primary")
                            compare_stop = gr.Button("Stop", variant="stop")
                        compare_progress = gr.HTML(progress_html(0, "Select two or more policies."))
                        with gr.Row():
                            compare_videos = [gr.Video(label=p, visible=False, interactive=False, height=220)
                                              for p in policies]
                        compare_plot = gr.Plot(compare_figure(None), label="Memory and latency per block")
                        compare_table = gr.Dataframe(label="Summary per policy", interactive=False)
                    with gr.Tab("Replay"):
                        replay_tab = app_replay.ReplayTab()

        panels = app_panels.Panels(layers, pipe.fps, ttl)
        occ_layer, occ_unit, topk_layer, rope_layer = panels.occ_layer, panels.occ_unit, panels.topk_layer, \
            panels.rope_layer

        # -- events ----------------------------------------------------------------------------
        settings = [prompt, seconds, seed, randomize, policy, compressor, model, schedule, prompt_switch, *knobs]
        inputs = [*settings, occ_layer, occ_unit, topk_layer, rope_layer]
        outputs = [progress, preview, video, trace_files, summary, *panels.outputs, seed]
        buttons = [generate_btn, compare_btn]
        policy.change(on_policy, policy, [policy_note, compressor, advanced, *knobs], api_visibility="private",
                      queue=False)
        generating = generate_btn.click(_lock, None, buttons, queue=False, api_visibility="private").then(
            generate, inputs, outputs, api_name="generate", concurrency_id=admission.GENERATION,
            concurrency_limit=concurrency, preprocess=False,  # raw values: validate_request names a bad field
        )
        comparing = compare_btn.click(_lock, None, buttons, queue=False, api_visibility="private").then(
            compare, [*inputs, compare_policies], [compare_progress, *compare_videos, compare_plot, compare_table,
                                                   seed],
            api_name="compare", concurrency_id=admission.GENERATION, concurrency_limit=concurrency,
            preprocess=False,
        )
        for run in (generating, comparing):  # the page's .then() follows success only: unlock on failure too
            run.then(_unlock, None, buttons, queue=False, api_visibility="private")
            run.failure(_unlock, None, buttons, queue=False, api_visibility="private")
        for button in (stop_btn, compare_stop):
            button.click(stop, None, None, api_name="stop", concurrency_limit=None,
                         api_visibility="public" if button is stop_btn else "private")
        replay_tab.wire(panels)
        panels.wire()
        demo.unload(on_unload)
    demo.queue(default_concurrency_limit=concurrency, max_size=safety.queue_size())
    admission.ClientLimit(demo).install()  # at most PACKFORCING_JOBS_PER_CLIENT per client address
    return demo


demo = build_demo()

if __name__ == "__main__":
    demo.launch(**launch_kwargs())
