# Fake of comfy/lora_convert.py (ComfyUI 0.30.0): convert_lora rewrites a few trainers' key layouts (PEFT "base_model"
# prefixes, ...) into ones load_lora reads. The tests write kohya and diffusers keys, which it leaves alone.
def convert_lora(sd):
    return sd
