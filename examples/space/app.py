"""The Space: streamq's own page (`streamq.app`), nothing else. Runs locally too: `python app.py`."""

from streamq.app import build_app, launch

demo = build_app()

if __name__ == "__main__":
    launch(demo)
