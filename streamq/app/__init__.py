"""The web page (Gradio) around `iter_requantize`: `streamq app`, or `examples/space/app.py` as a Space.

Needs the `app` extra (`pip install "streamq[app]"`); `import streamq` never imports this package.
"""

from .page import build_app, launch

__all__ = ["build_app", "launch"]
