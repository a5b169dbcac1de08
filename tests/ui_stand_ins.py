"""Stand-ins for the hosts' `modules.ui_components.InputAccordion`, for building the UI in tests.

A1111 (gradio 3.41) has a `gr.Checkbox` subclass that hides itself and opens a `gr.Accordion` with the same
keyword arguments; Forge (gradio 4.40) has the same class under the name `InputAccordionImpl`, reached
through a factory function `InputAccordion(value, **kwargs)`. Both are followed here: the checkbox's id is
`<elem_id>-checkbox`, the accordion's id is `elem_id`, `extra()` gives a column for the accordion header, and
the checkbox's change event calls the host page's `inputAccordionChecked` when the page defines it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import wraps

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".", 1)[0])

# The host's page script defines inputAccordionChecked; the test page may not load it.
_SYNC_JS = ('function(checked){ if (typeof inputAccordionChecked === "function") '
            'inputAccordionChecked("%s", checked); }')


@contextmanager
def _without_pyi() -> Iterator[None]:
    """gradio 4 writes a .pyi beside every new component class's source file; Forge turns that off for its
    own classes (webui_do_not_create_gradio_pyi_thank_you), and so does this stand-in, for the test tree."""
    meta = getattr(gr, "component_meta", None)  # gradio 4 only
    if meta is None:
        yield
        return
    original = meta.create_or_modify_pyi
    meta.create_or_modify_pyi = lambda component_class, class_name, events: None
    try:
        yield
    finally:
        meta.create_or_modify_pyi = original


with _without_pyi():
    class InputAccordionImpl(gr.Checkbox):
        """A hidden checkbox whose value is the accordion's open (enabled) state."""

        webui_do_not_create_gradio_pyi_thank_you = True  # as Forge marks it

        # Forge keeps gr.Checkbox's signature: gradio 4 reads a component's config from its __init__.
        @wraps(gr.Checkbox.__init__)
        def __init__(self, value: bool = False, setup: bool = False, **kwargs):
            if not setup:  # gradio 4 re-creates components without the accordion part
                super().__init__(value=value, **kwargs)
                return
            self.accordion_id = kwargs.get("elem_id") or "input-accordion-test"
            checkbox_id = f"{self.accordion_id}-checkbox"
            super().__init__(value=value, **{**kwargs, "elem_id": checkbox_id, "visible": False})
            # Forge's shim maps _js to js; plain gradio 4 knows only js.
            js_keyword = "_js" if GRADIO_MAJOR < 4 else "js"
            self.change(fn=None, inputs=[self], **{js_keyword: _SYNC_JS % self.accordion_id})
            self.accordion = gr.Accordion(**{**kwargs, "elem_id": self.accordion_id,
                                             "label": kwargs.get("label", "Accordion"),
                                             "elem_classes": ["input-accordion"], "open": value})

        def extra(self) -> gr.Column:
            return gr.Column(elem_id=f"{self.accordion_id}-extra", elem_classes="input-accordion-extra",
                             min_width=0)

        def __enter__(self):
            self.accordion.__enter__()
            return self

        def __exit__(self, exc_type, exc_val, exc_tb):
            self.accordion.__exit__(exc_type, exc_val, exc_tb)

        def get_block_name(self) -> str:
            return "checkbox"


def InputAccordion(value: bool = False, **kwargs) -> InputAccordionImpl:
    return InputAccordionImpl(value=value, setup=True, **kwargs)
