"""The Gradio page: a form, a plan preview, live progress and a link; also the `/requantize` API.

No `from __future__ import annotations` here: gradio finds the `gr.OAuthToken`/`gr.OAuthProfile`
parameters it fills in by their type hints at run time.
"""

import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, Optional

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry or version check: works offline

import gradio as gr  # noqa: E402
from gradio.utils import get_space  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402

from ..errors import StreamqError  # noqa: E402
from ..report import format_gguf_plan, format_plan, human_size  # noqa: E402
from ..settings import COMPUTE_DTYPES, DEFAULT_BLOCKSIZE, INT4_GROUP_SIZES  # noqa: E402
from ..surface import using  # noqa: E402
from .run import (  # noqa: E402
    FREE_DISK_SHARE,
    QUANT_TYPES,
    Conversion,
    RunProgress,
    Snapshot,
    choose_disk_budget,
    default_output,
    one_line,
    plan_conversion,
    work_root,
)

logger = logging.getLogger("streamq.app")

POLL_SECONDS = 0.5
DEFAULT_GROUP_SIZE = DEFAULT_BLOCKSIZE["int4"]
INTRO = """# streamq: a 4-bit (or GGUF) copy of any Hub model
Converts the model **tensor by tensor** (tensors stream in by range, are quantized and written into output shards of 1 GB, or GGUF files
for llama.cpp, Ollama and LM Studio, which are uploaded and deleted), so this machine needs neither the model's memory nor its disk.
Starting the same conversion again resumes it."""
# A script's call of `/requantize`, shown on the page and in the README (a test runs it against the page):
# `oauth_token=` is the token the conversion runs with, which a Space needs (gradio_client sends it only to
# endpoints taking a gr.OAuthToken); gradio_client's `token=` only lets the script into a private Space.
API_EXAMPLE = """from gradio_client import Client
client = Client("http://127.0.0.1:7860/", oauth_token="hf_...")  # a Space: Client("you/streamq-4bit", ...)
progress, link, result = client.predict("org/model", "you/model-nf4", "nf4", True, "bfloat16", False, 128, False, api_name="/requantize")
# source, output ("" = the default name), quant_type, double_quant, compute_dtype, private, int4 group size, overwrite
# quant_type: nf4, fp4, int4, bf16, or GGUF: gguf-q4_k_m, gguf-q5_k_m, gguf-q6_k, gguf-q8_0, gguf-q4_0"""


def page_error(message: str) -> gr.Error:
    """The error the page shows and API callers get (a repo that is not there, an output that is a local
    path). gradio prints an Error's traceback unless `print_exception=False`, which for a user's mistake
    is noise: the server logs it as one line. A crash's traceback is logged where it happens (`RunProgress`)."""
    message = one_line(message)
    logger.warning("%s", message)
    return gr.Error(message, print_exception=False)


def build_app(*, endpoint: Optional[str] = None, work_dir: Optional[str] = None, cluster: Optional[str] = None) -> gr.Blocks:
    """The page. `endpoint`: the Hub (default HF_ENDPOINT or huggingface.co); `work_dir`: see `work_root`;
    `cluster`: a Ray cluster's address, where conversions (but GGUF) run.

    On a Space (`hf_oauth: true`) visitors log in and their own token is used; elsewhere the token is
    HF_TOKEN or the saved login, as for `streamq requantize`, unless a script passes its own
    (gradio_client's `oauth_token=`). The token is never shown or stored.
    """
    in_space = get_space() is not None
    root = work_root(work_dir)

    def token_of(oauth_token: Optional[gr.OAuthToken]) -> Optional[str]:
        """The caller's token (Space login, or gradio_client's `oauth_token=`); without one, a Space
        refuses (never the owner's token for an anonymous visitor) and a local app uses HF_TOKEN or the saved login."""
        if oauth_token is not None:
            return oauth_token.token
        if in_space:
            raise page_error("Log in with the Hugging Face button first: the conversion runs with your account.")
        return None

    def user_of(profile: Optional[gr.OAuthProfile], token: Optional[str]) -> Optional[str]:
        if profile is not None:
            return profile.username
        try:
            return HfApi(endpoint=endpoint, token=token).whoami()["name"]
        except Exception:  # not logged in, or the Hub unreachable: the user types the output name
            return None

    def suggest_output(source: str, quant_type: str, output: str, last: str, profile: Optional[gr.OAuthProfile] = None, oauth_token: Optional[gr.OAuthToken] = None) -> tuple[str, str]:
        """Fill `<user>/<model>-<quant>` (GGUF: `<user>/<model>-<TYPE>-GGUF`) unless the user typed an output name of their own."""
        if output.strip() and output != last:
            return output, last
        token = oauth_token.token if oauth_token is not None else None
        suggestion = default_output(source.strip(), quant_type, user_of(profile, token)) if source.strip() else ""
        return suggestion, suggestion

    def plan(
        source: str, quant_type: str, double_quant: bool, compute_dtype: str, group_size: int = DEFAULT_GROUP_SIZE,
        oauth_token: Optional[gr.OAuthToken] = None,
    ) -> str:
        """The plan, as `streamq plan` prints it, and the disk budget this machine would give the run."""
        try:
            job = Conversion(source.strip(), "", quant_type, double_quant, compute_dtype, group_size=int(group_size), token=token_of(oauth_token), endpoint=endpoint)
            with using("page"):
                summary = plan_conversion(job)
        except (StreamqError, ValueError) as exc:
            raise page_error(str(exc)) from None
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        budget = choose_disk_budget(summary, free)
        budget_line = (
            f"disk budget on this machine: {human_size(budget)} of {human_size(free)} free in the work directory"
            if budget is not None
            else f"free disk in the work directory: {human_size(free)}, less than the {human_size(summary['disk_needed_bytes'])} needed"
        )
        text = format_gguf_plan(summary) if summary.get("format") == "gguf" else format_plan(summary)
        return f"```\n{text}\n{budget_line}\n```"

    def requantize(
        source: str, output: str, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "bfloat16",
        private: bool = False, group_size: int = DEFAULT_GROUP_SIZE, overwrite: bool = False,
        oauth_token: Optional[gr.OAuthToken] = None, oauth_profile: Optional[gr.OAuthProfile] = None,
    ) -> Iterator[tuple[str, str, Optional[dict[str, Any]]]]:
        """Convert `source` into `output` (both Hub repo ids); yields the progress, then the link and the result."""
        token = token_of(oauth_token)
        if not output.strip():
            output = default_output(source.strip(), quant_type, user_of(oauth_profile, token))
        try:
            if not output:
                raise ValueError("give an output repo name (org/name): your Hub user name could not be found")
            job = Conversion(
                source.strip(), output.strip(), quant_type, double_quant, compute_dtype, private, group_size=int(group_size),
                overwrite=overwrite, token=token, endpoint=endpoint, cluster=cluster,
            )
        except ValueError as exc:
            yield "**Phase:** failed", f"**Error:** {exc}", None
            raise page_error(str(exc)) from None
        run = RunProgress(job, root).start()
        while not run.wait(POLL_SECONDS):
            yield render_progress(run.snapshot()), "", None
        snap = run.snapshot()
        if snap.error is not None:
            yield render_progress(snap), f"**Error:** {snap.error}", None
            raise page_error(snap.error)  # API callers get it as an exception with this message
        result = snap.result
        assert result is not None
        details = {**asdict(result), "ratio": result.ratio, "url": result.output}
        yield render_progress(snap), f"**Done:** [{result.output}]({result.output})", details

    with gr.Blocks(title="streamq: 4-bit or GGUF copy of a Hub model", analytics_enabled=False) as page:
        gr.Markdown(INTRO)
        if in_space:
            gr.LoginButton()
        with gr.Row():
            source = gr.Textbox(label="Model on the Hub (org/name, optionally @revision)", placeholder="Qwen/Qwen3-8B", elem_id="source")
            output = gr.Textbox(label="Output repo (default: <you>/<model>-<quant type>, GGUF: <you>/<model>-<TYPE>-GGUF)", elem_id="output")
        last_default = gr.State("")
        quant_type = gr.Radio(  # a row of its own: the choices side by side
            [(label, name) for name, (label, _) in QUANT_TYPES.items()], value="nf4", label="Quant type",
            info="NF4, FP4, int4 and bf16 write safetensors (transformers, vLLM); GGUF writes llama.cpp's files (llama.cpp, Ollama, LM Studio)",
            elem_id="quant-type",
        )
        with gr.Row():
            double_quant = gr.Checkbox(value=True, label="Double quant (quantize the absmax statistics too)", elem_id="double-quant")
            compute_dtype = gr.Dropdown(list(COMPUTE_DTYPES), value="bfloat16", label="Compute dtype", elem_id="compute-dtype")
            group_size = gr.Dropdown(
                list(INT4_GROUP_SIZES), value=DEFAULT_GROUP_SIZE, label="int4 group size (32 keeps a Q4_0-style QAT model exact)",
                visible=False, elem_id="group-size",
            )
            private = gr.Checkbox(value=False, label="Private output repo", elem_id="private")
            overwrite = gr.Checkbox(value=False, label="Overwrite an existing output (made otherwise, or not by streamq)", elem_id="overwrite")
        with gr.Row():
            plan_button = gr.Button("Show plan", elem_id="plan")
            start_button = gr.Button("Convert", variant="primary", elem_id="convert")
        plan_box = gr.Markdown(label="plan", elem_id="plan-box")
        status = gr.Markdown(label="progress", elem_id="status")
        link = gr.Markdown(label="link", elem_id="result")
        with gr.Accordion("Result as data", open=False):
            details = gr.JSON(label="result", elem_id="details")
        gr.Markdown(
            f"One conversion runs at a time; others wait in the queue. The disk budget is two output shards, the largest "
            f"tensor and 1 GB of read-ahead, at most {FREE_DISK_SHARE:.0%} of the work directory's free space. "
            "Scripts convert through the API, with their own Hub token:"
        )
        gr.Markdown(f"```python\n{API_EXAMPLE}\n```", elem_id="api-example")

        def format_options(name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
            bnb = QUANT_TYPES[name][1]
            return gr.update(visible=bnb), gr.update(visible=bnb), gr.update(visible=name == "int4")

        for trigger in (source.blur, source.submit, quant_type.change):
            trigger(suggest_output, [source, quant_type, output, last_default], [output, last_default], api_name=False, queue=False)
        quant_type.change(format_options, quant_type, [double_quant, compute_dtype, group_size], api_name=False, queue=False)
        plan_button.click(plan, [source, quant_type, double_quant, compute_dtype, group_size], plan_box, api_name="plan", concurrency_id="plan", concurrency_limit=2)
        start_button.click(
            requantize, [source, output, quant_type, double_quant, compute_dtype, private, group_size, overwrite], [status, link, details],
            api_name="requantize", concurrency_id="requantize", concurrency_limit=1, show_progress="hidden",
        )
    return page


def render_progress(snap: Snapshot) -> str:
    """Phase, shards, bytes, speed and disk, as a few lines of Markdown."""
    lines = [f"**Phase:** {snap.phase}"]
    if snap.shards_total:
        earlier = f" ({snap.shards_skipped} done by an earlier run)" if snap.shards_skipped else ""
        lines.append(f"**Shards:** {snap.shards_done} of {snap.shards_total} published{earlier}")
    if snap.bytes_total:
        share = snap.bytes_done / snap.bytes_total
        lines.append(
            f"**Input converted:** {human_size(snap.bytes_done)} of {human_size(snap.bytes_total)} ({share:.0%}), "
            f"{snap.speed / 1e6:.1f} MB/s"
        )
    budget = f" (budget {human_size(snap.disk_budget)})" if snap.disk_budget else ""
    lines.append(f"**Work directory:** {human_size(snap.work_dir_bytes)} on disk now{budget}")
    lines.append(f"**Elapsed:** {snap.elapsed:.1f} s")
    return "  \n".join(lines)


def launch(page: gr.Blocks, *, host: Optional[str] = None, port: Optional[int] = None) -> None:
    """Serve `page` with its queue: one conversion at a time, the rest waiting (also when run as a Space)."""
    page.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, show_error=True, ssr_mode=False, footer_links=["api"],
    )


__all__ = ["build_app", "launch", "render_progress"]
