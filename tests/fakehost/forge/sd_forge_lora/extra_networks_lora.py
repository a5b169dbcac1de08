# Fake of extensions-builtin/sd_forge_lora/extra_networks_lora.py (stable-diffusion-webui-forge dfdcbab6).
# Kept: positional/named te, unet (defaults to te) and dyn (parsed, ignored) multipliers, "Lora hashes".
import networks

from modules import extra_networks, shared


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__('lora')
        self.errors = {}

    def activate(self, p, params_list):
        names, te_multipliers, unet_multipliers, dyn_dims = [], [], [], []
        for params in params_list:
            names.append(params.positional[0])
            te_multiplier = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            te_multiplier = float(params.named.get("te", te_multiplier))
            unet_multiplier = float(params.positional[2]) if len(params.positional) > 2 else te_multiplier
            unet_multiplier = float(params.named.get("unet", unet_multiplier))
            dyn_dim = int(params.positional[3]) if len(params.positional) > 3 else None
            dyn_dim = int(params.named["dyn"]) if "dyn" in params.named else dyn_dim
            te_multipliers.append(te_multiplier)
            unet_multipliers.append(unet_multiplier)
            dyn_dims.append(dyn_dim)

        networks.load_networks(names, te_multipliers, unet_multipliers, dyn_dims)

        if shared.opts.lora_add_hashes_to_infotext:
            hashes = {item.mentioned_name: item.network_on_disk.shorthash for item in networks.loaded_networks}
            if hashes:
                p.extra_generation_params["Lora hashes"] = ', '.join(f'{k}: {v}' for k, v in hashes.items())

    def deactivate(self, p):
        self.errors.clear()
