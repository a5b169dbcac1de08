# Fake of extensions-builtin/sd_forge_lora/extra_networks_lora.py (Forge Neo 2.26).
# Kept: positional/named te and unet (defaulting to te) multipliers, no dyn; networks.load_networks(names,
# te_multipliers, unet_multipliers); "Lora hashes" from p.lora_hashes (kept across the hires activation).
# Simplified: no default LoRA option.
import networks

from modules import extra_networks, shared


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    remove_symbols = str.maketrans("", "", ":,")

    def __init__(self):
        super().__init__("lora")
        self.errors = {}

    def activate(self, p, params_list):
        self.errors.clear()
        names, te_multipliers, unet_multipliers = [], [], []
        for params in params_list:
            names.append(params.positional[0])
            te = float(params.named.get("te", params.positional[1] if len(params.positional) > 1 else 1.0))
            unet = float(params.named.get("unet", params.positional[2] if len(params.positional) > 2 else te))
            te_multipliers.append(te)
            unet_multipliers.append(unet)

        networks.load_networks(names, te_multipliers, unet_multipliers)

        if shared.opts.lora_add_hashes_to_infotext:
            if not getattr(p, "is_hr_pass", False) or not hasattr(p, "lora_hashes"):
                p.lora_hashes = {}
            for item in networks.loaded_networks:
                if item.network_on_disk.shorthash and item.mentioned_name:
                    p.lora_hashes[item.mentioned_name.translate(self.remove_symbols)] = item.network_on_disk.shorthash
            if p.lora_hashes:
                p.extra_generation_params["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in p.lora_hashes.items())

    def deactivate(self, p):
        self.errors.clear()
