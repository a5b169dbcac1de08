# Fake Forge Neo backend/nn/: the model families Neo 2.26 adds (lumina.py for Lumina 2 and Z-Image, qwen.py,
# chroma.py, flux2.py, wan.py, krea.py); unet.py and flux.py are the fake Forge's, found after these.
from neo_overlay import extend

extend(__path__, "backend.nn")
