"""Host glue: the only code importing modules.*, backend.* or gradio."""
