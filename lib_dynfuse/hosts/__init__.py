"""Host glue: the only code importing modules.*, backend.*, gradio, comfy.*, comfy_api.* or folder_paths."""
