# Fake of modules/extra_networks.py (stable-diffusion-webui-forge dfdcbab6): <name:args> parsing and activation.
import re
import sys
from collections import defaultdict

re_extra_net = re.compile(r"<(\w+):([^>]+)>")
extra_network_registry = {}


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split('=', 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    return re.sub(re_extra_net, found, prompt), res


def parse_prompts(prompts):
    res = []
    extra_data = None
    for prompt in prompts:
        updated_prompt, parsed_extra_data = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed_extra_data
        res.append(updated_prompt)
    return res, extra_data


def activate(p, extra_network_data):
    # As the WebUI: an extra network that fails to activate (e.g. a LoRA file that cannot be read) is reported
    # (errors.display: the message and the traceback) and the generation goes on.
    for extra_network_name, extra_network_args in extra_network_data.items():
        extra_network = extra_network_registry.get(extra_network_name, None)
        if extra_network is not None:
            try:
                extra_network.activate(p, extra_network_args)
            except Exception as e:
                print(f"*** Error activating extra network {extra_network_name} with arguments {extra_network_args}: "
                      f"{type(e).__name__}: {e}", file=sys.stderr)
    for extra_network_name, extra_network in extra_network_registry.items():
        if extra_network_name not in extra_network_data:
            try:
                extra_network.activate(p, [])
            except Exception as e:
                print(f"*** Error activating extra network {extra_network_name}: {type(e).__name__}: {e}",
                      file=sys.stderr)


def deactivate(p, extra_network_data):
    for extra_network in extra_network_registry.values():
        extra_network.deactivate(p)
