# Fake of extensions-builtin/sd_forge_lora/network.py (stable-diffusion-webui-forge dfdcbab6): NetworkOnDisk and
# the bare Network shells (their .modules stay empty on Forge).
import hashlib
import os


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.alias = name
        self.shorthash = None

    def read_hash(self):
        if self.shorthash is None:
            with open(self.filename, "rb") as f:
                self.shorthash = hashlib.sha256(f.read()).hexdigest()[:12]


class Network:
    def __init__(self, name, network_on_disk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}
        self.mtime = os.path.getmtime(network_on_disk.filename)
        self.mentioned_name = None
