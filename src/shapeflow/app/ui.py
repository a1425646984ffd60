"""The gradio page of ``shapeflow app`` (three tabs) on the handlers of :mod:`shapeflow.app.handlers`.

Security and load settings, all in :func:`launch`:

* file serving: gradio's upload and cache folder is the app's output folder (``GRADIO_TEMP_DIR``, set
  by :func:`shapeflow.app.configure_environment` before gradio is imported), ``allowed_paths`` is empty,
  so the server hands out nothing outside that folder; each visitor's results are in their own sub-folder
  (:meth:`App.session_dir <shapeflow.app.handlers.App.session_dir>`, keyed by gradio's session hash) and only
  their own page learns those file names;
* uploads: ``max_file_size`` (gradio refuses bigger uploads), then :func:`~shapeflow.app.handlers.check_upload`;
* a queue: the model events share one concurrency group of ``concurrency`` workers (default 1: a CPU runs
  one model at a time best), the data pictures another;
* errors a visitor causes are shown in the page as one line (``gr.Error``); anything else is logged with its
  traceback on the server and shown as a one-line "internal error".
"""

from __future__ import annotations

import functools
import logging

import gradio as gr

from shapeflow.app.handlers import UPLOAD_EXTENSIONS, App, AppError

log = logging.getLogger(__name__)

HISTORY = 12  # generated shapes kept in a visitor's gallery
# System fonts: the default theme fetches Google Fonts, which an offline laptop or server cannot reach.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])


def _visible_errors(fn):
    """Turn the visitor's errors into a one-line message in the page, and hide stack traces."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except AppError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # a bug: the log gets the traceback, the page one line
            log.exception("request failed")
            raise gr.Error(f"internal error ({type(e).__name__}); the server log has the details",
                           print_exception=False) from None

    return wrapper


def _progress(progress: gr.Progress):
    return lambda fraction, stage: progress(fraction, desc=stage)


def build(app: App, *, concurrency: int = 1) -> gr.Blocks:
    """The page: Generate, Reconstruct and Data tabs."""
    cat = app.catalog
    gens = list(cat.generators)
    vaes = list(cat.vaes)
    info0 = app.generator_info(gens[0])
    model_events = dict(concurrency_limit=concurrency, concurrency_id="models")

    with gr.Blocks(title="shapeflow", analytics_enabled=False) as page:
        gr.Markdown("## shapeflow\nGenerate shapes, reconstruct your meshes through a VAE, and look at "
                    "preprocessed data. Runs locally; nothing leaves this machine.")
        with gr.Tabs():
            # ---------------------------------------------------------------- Generate
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        generator = gr.Dropdown(gens, value=gens[0], label="Generator", elem_id="generator")
                        with gr.Accordion("Other checkpoints", open=False):
                            dit_path = gr.Textbox(label="DiT checkpoint path (under --runs; overrides the list)",
                                                  elem_id="dit-path")
                            vae = gr.Dropdown(["paired"] + vaes, value="paired", label="VAE", elem_id="gen-vae")
                            rescan = gr.Button("Rescan --runs", size="sm")
                        class_name = gr.Dropdown(info0["classes"], value=(info0["classes"] or [None])[0],
                                                 label="Class", visible=info0["cond"] == "class",
                                                 elem_id="class")
                        image = gr.Image(type="filepath", label="Image", visible=info0["cond"] == "image",
                                         image_mode="RGBA")
                        num = gr.Slider(1, 4, value=1, step=1, label="Shapes")
                        seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                        steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="steps")
                        method = gr.Radio(["euler", "heun", "midpoint"], value="heun", label="Sampler")
                        cfg = gr.Slider(1.0, 10.0, value=1.0, step=0.5, label="Guidance scale (1: none)")
                        resolution = gr.Slider(32, 384, value=128, step=32, label="Decoding resolution (VecSet)")
                        tokens = gr.Number(0, precision=0, minimum=0, label="Latent tokens (0: as trained)",
                                           elem_id="tokens")
                        go = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                    with gr.Column(scale=2):
                        view = gr.Model3D(label="Result (drag to turn)", clear_color=(1.0, 1.0, 1.0, 1.0),
                                          height=440, elem_id="gen-view")
                        status = gr.Markdown(elem_id="gen-status")
                        files = gr.File(label="Downloads (GLB, OBJ, PLY)", file_count="multiple",
                                        interactive=False, elem_id="gen-files")
                        gallery = gr.Gallery(label="This session's results", columns=6, height=200,
                                             object_fit="contain", fit_columns=False, elem_id="gen-gallery")
                history = gr.State([])

            # ---------------------------------------------------------------- Reconstruct
            with gr.Tab("Reconstruct", id="reconstruct"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=300):
                        upload = gr.File(label=f"Mesh ({', '.join(e[1:].upper() for e in UPLOAD_EXTENSIONS)})",
                                         file_types=list(UPLOAD_EXTENSIONS), type="filepath",
                                         elem_id="recon-upload")
                        rvae = gr.Dropdown(vaes, value="shipped: sparse" if "shipped: sparse" in vaes else vaes[0],
                                           label="VAE", elem_id="recon-vae")
                        rres = gr.Slider(64, 512, value=256, step=64, label="Decoding resolution", elem_id="recon-res")
                        pres = gr.Slider(64, 512, value=256, step=64, label="Watertight resolution of the input",
                                         elem_id="recon-prep-res")
                        rgo = gr.Button("Reconstruct", variant="primary", elem_id="recon-btn")
                        rtable = gr.Dataframe(headers=["", "value"], label="Metrics and times",
                                              interactive=False, elem_id="recon-metrics")
                    with gr.Column(scale=2):
                        with gr.Row():
                            wview = gr.Model3D(label="Watertight input", clear_color=(1.0, 1.0, 1.0, 1.0),
                                               height=400, elem_id="recon-input")
                            rview = gr.Model3D(label="Reconstruction", clear_color=(1.0, 1.0, 1.0, 1.0),
                                               height=400, elem_id="recon-view")
                        rfiles = gr.File(label="Downloads", file_count="multiple", interactive=False,
                                         elem_id="recon-files")

            # ---------------------------------------------------------------- Data
            with gr.Tab("Data", id="data"):
                datasets = list(cat.datasets)
                with gr.Row():
                    dataset = gr.Dropdown(datasets, value=None, label="Preprocessed folder (under --data / --runs)",
                                          elem_id="dataset")
                    obj = gr.Dropdown([], label="Object (ok ones)", elem_id="data-object")
                dsummary = gr.Markdown("No preprocessed folder found: start the app with --data DIR."
                                       if not datasets else "Pick a folder.", elem_id="data-summary")
                thumbs = gr.Gallery(label="Objects", columns=8, height=220, object_fit="contain", fit_columns=False,
                                    elem_id="data-thumbs")
                dtable = gr.Dataframe(headers=["id", "class", "source", "status", "error"], interactive=False,
                                      wrap=True, label="Manifest", elem_id="data-table")
                pictures = gr.Gallery(label="Samples of the object", columns=3, height=320, object_fit="contain",
                                      elem_id="data-pictures")

        # ------------------------------------------------------------------------ events
        @_visible_errors
        def on_generator(choice, path):
            info = app.generator_info(choice, path)
            classes = info["classes"]
            s = info["sampler"] or {}  # a released generator's own defaults (Hunyuan3D: 49 Euler steps, cfg 5)
            return (gr.update(choices=classes, value=classes[0] if classes else None,
                              visible=info["cond"] == "class"),
                    gr.update(visible=info["cond"] == "image"),
                    gr.update(value=s["steps"]) if s else gr.update(),
                    gr.update(value=s["method"]) if s else gr.update(),
                    gr.update(value=s["cfg"]) if s else gr.update())

        @_visible_errors
        def on_rescan():
            cat.scan()
            return (gr.update(choices=list(cat.generators)), gr.update(choices=["paired"] + list(cat.vaes)),
                    gr.update(choices=list(cat.vaes)), gr.update(choices=list(cat.datasets)))

        @_visible_errors
        def on_generate(generator, dit_path, vae, class_name, image, num, seed, steps, method, cfg, resolution,
                        tokens, history, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
            g = app.generate(request.session_hash, generator, dit_path=dit_path or "", vae=vae,
                             class_name=class_name, image=image, num=int(num), seed=int(seed or 0),
                             steps=int(steps), method=method, cfg=float(cfg), resolution=int(resolution),
                             num_tokens=int(tokens) if tokens else None, progress=_progress(progress))
            new = [(str(s.preview), f"{s.label or 'sample'} #{int(seed or 0) + s.index}") for s in g.samples]
            history = (new[::-1] + list(history))[:HISTORY]
            downloads = [str(p) for s in g.samples for p in s.files.values()]
            return str(g.samples[0].files["glb"]), g.message, downloads, history, history

        @_visible_errors
        def on_reconstruct(upload, vae, res, pres, request: gr.Request, progress=gr.Progress()):
            if not upload:
                raise AppError("upload a mesh first")
            r = app.reconstruct(request.session_hash, upload, vae, resolution=int(res), prep_resolution=int(pres),
                                progress=_progress(progress))
            m = r.metrics
            rows = [["IoU", f"{m['iou']:.4f}"], ["Chamfer-L1", f"{m['chamfer_l1']:.5f}"],
                    ["F-score@1%", f"{m['f_score@1%']:.4f}"], ["normal consistency", f"{m['normal_consistency']:.4f}"],
                    ["faces", f"{int(m['faces'])}"]]
            rows += [[f"{k} (s)", f"{v:.2f}"] for k, v in r.seconds.items()]
            return str(r.watertight), str(r.reconstruction), rows, [str(p) for p in r.files]

        @_visible_errors
        def on_dataset(label):
            if not label:
                return gr.update(), gr.update(), gr.update(), gr.update(choices=[], value=None)
            rows = app.data_objects(label)
            ok = [r["id"] for r in rows if r["status"] == "ok"]
            failed = len(rows) - len(ok)
            summary = f"**{len(rows)}** objects: {len(ok)} ok, {failed} failed."
            table = [[r["id"], r["class"], r["source"], r["status"], r["error"]] for r in rows]
            thumbs = [(str(p), c) for p, c in app.data_thumbnails(label)]
            return summary, thumbs, table, gr.update(choices=ok, value=None)

        @_visible_errors
        def on_object(label, oid):
            if not label or not oid:
                return []
            return [(str(p), c) for p, c in app.data_pictures(label, oid)]

        generator.change(on_generator, [generator, dit_path], [class_name, image, steps, method, cfg])
        dit_path.submit(on_generator, [generator, dit_path], [class_name, image, steps, method, cfg])
        rescan.click(on_rescan, None, [generator, vae, rvae, dataset])
        go.click(on_generate, [generator, dit_path, vae, class_name, image, num, seed, steps, method, cfg,
                               resolution, tokens, history], [view, status, files, gallery, history],
                 show_progress_on=view, **model_events)
        rgo.click(on_reconstruct, [upload, rvae, rres, pres], [wview, rview, rtable, rfiles],
                  show_progress_on=[wview, rview], **model_events)
        dataset.change(on_dataset, [dataset], [dsummary, thumbs, dtable, obj], concurrency_limit=2,
                       concurrency_id="data")
        obj.change(on_object, [dataset, obj], [pictures], concurrency_limit=2, concurrency_id="data")
    return page


def launch(app: App, *, host: str = "127.0.0.1", port: int = 7860, concurrency: int = 1, max_queue: int = 64,
           max_upload_mb: float = 100) -> None:
    """Build the page and serve it until interrupted (see the module docstring for the settings)."""
    page = build(app, concurrency=concurrency)
    page.queue(default_concurrency_limit=concurrency, max_size=max_queue, api_open=False)
    page.launch(server_name=host, server_port=port, allowed_paths=[], max_file_size=int(max_upload_mb * 2**20),
                share=False, inbrowser=False, show_error=False, ssr_mode=False, theme=THEME, quiet=True,
                mcp_server=False, pwa=False, run_history=False, footer_links=["gradio", "settings"])
