"""LoRA files: reading a file into per-layer deltas, checking its factors, and the prompt's ``<lora:...>`` tags.
It imports only engine/ (the delta types it produces)."""
