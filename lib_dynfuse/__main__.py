import sys

# The command line runs without a WebUI, so the packages a WebUI brings may be missing: say which, and how to
# install them, in one line instead of a traceback.
_PACKAGES = {"torch": "torch", "safetensors": "safetensors", "PIL": "Pillow"}

try:
    from lib_dynfuse.cli import main

    code = main()
except ModuleNotFoundError as error:
    package = _PACKAGES.get((error.name or "").partition(".")[0])
    if package is None:
        raise
    print(f"error: the Python package {package} is not installed; install what `python -m lib_dynfuse` needs "
          f'with: pip install -e ".[demo]" (in the repository\'s folder)', file=sys.stderr)
    code = 2
sys.exit(code)
