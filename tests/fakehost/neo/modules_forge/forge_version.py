# Fake of modules_forge/forge_version.py (Forge Neo 2.26, webui/modules_forge/forge_version.py).
version = "neo"
release = "2.26"
