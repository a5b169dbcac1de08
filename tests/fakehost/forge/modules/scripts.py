# Fake of modules/scripts.py (stable-diffusion-webui-forge dfdcbab6): Script, AlwaysVisible, PostSampleArgs and
# the always-on part of ScriptRunner. Kept: every call is wrapped in try/except and only reported;
# process_before_every_sampling iterates alwayson_scripts in load order (Forge's second definition wins).
# Simplified: no UI, no ordering rules, no selectable scripts; basedir() returns what the loader set.
import os
import traceback

AlwaysVisible = object()
current_basedir = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def basedir():
    """The root of the extension whose script file is being loaded (the harness sets current_basedir)."""
    return current_basedir


class PostSampleArgs:
    def __init__(self, samples):
        self.samples = samples


class Script:
    filename = None
    args_from = 0
    args_to = 0
    alwayson = True

    def title(self):
        return "script"

    def show(self, is_img2img):
        return AlwaysVisible


class ScriptRunner:
    def __init__(self, scripts=()):
        self.alwayson_scripts = []
        for script in scripts:
            self.add(script)

    def add(self, script, n_args=0):
        script.args_from = self.alwayson_scripts[-1].args_to if self.alwayson_scripts else 0
        script.args_to = script.args_from + n_args
        self.alwayson_scripts.append(script)

    def _each(self, method, p, *args, **kwargs):
        for script in self.alwayson_scripts:
            fn = getattr(script, method, None)
            if fn is None:
                continue
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                fn(p, *args, *script_args, **kwargs)
            except Exception:
                print(f"Error running {method}: {script.filename}")
                traceback.print_exc()

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._each("process_before_every_sampling", p, **kwargs)

    def before_hr(self, p):
        self._each("before_hr", p)

    def post_sample(self, p, ps):
        self._each("post_sample", p, ps)

    def postprocess_batch(self, p, images, **kwargs):
        self._each("postprocess_batch", p, images=images, **kwargs)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)
