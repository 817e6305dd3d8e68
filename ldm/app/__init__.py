"""The web UI over `ldm.Pipeline`: `python -m ldm.app` (or `make ui`) serves it on http://127.0.0.1:7860.

`ldm.app.cli` reads the flags and launches; `ldm.app.ui` is the gradio page and its handlers;
`ldm.app.fields` the parts computed without gradio (a PNG's settings as field values, the drawn mask, the
Canny preview). Nothing here is imported by `ldm` itself, so the library never loads gradio.
"""
