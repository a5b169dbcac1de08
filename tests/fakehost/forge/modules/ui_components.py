# Fake of modules/ui_components.py (stable-diffusion-webui-forge dfdcbab6): InputAccordion(value, **kwargs), the
# factory over InputAccordionImpl, a hidden gr.Checkbox driving a gr.Accordion. tests/ui_stand_ins.py follows
# the real class for the UI tests; the fake host hands out the same one.
from ui_stand_ins import InputAccordion, InputAccordionImpl  # noqa: F401
