# Follows scripts/xyz_grid.py of AUTOMATIC1111 v1.10.1 (82a973c0): AxisOption / AxisOptionTxt2Img /
# AxisOptionImg2Img, the module-level axis_options list (read when the UI is built), process_axis (csv split, type
# cast, confirm before any image is made) and one cell (copy(p), apply, process_images). Ranges, grids and the UI
# are left out; `run_axis` is this fake's entry point for one axis.
from copy import copy
from csv import reader
from io import StringIO
from itertools import chain

from modules import scripts
from modules.processing import process_images


def apply_field(field):
    def fun(p, x, xs):
        setattr(p, field, x)

    return fun


def format_value_add_label(p, opt, x):
    if type(x) == float:
        x = round(x, 8)
    return f"{opt.label}: {x}"


def do_nothing(p, x, xs):
    pass


def str_permutations(x):
    return x


def csv_string_to_list_strip(data_str):
    return list(map(str.strip, chain.from_iterable(reader(StringIO(data_str), skipinitialspace=True))))


class AxisOption:
    def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0, choices=None,
                 prepare=None):
        self.label = label
        self.type = type
        self.apply = apply
        self.format_value = format_value
        self.confirm = confirm
        self.cost = cost
        self.prepare = prepare
        self.choices = choices


class AxisOptionImg2Img(AxisOption):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = True


class AxisOptionTxt2Img(AxisOption):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = False


axis_options = [
    AxisOption("Nothing", str, do_nothing),
    AxisOption("Seed", int, apply_field("seed")),
    AxisOption("Steps", int, apply_field("steps")),
    AxisOption("CFG Scale", float, apply_field("cfg_scale")),
]


def process_axis(p, opt, vals, vals_dropdown=None, csv_mode=False):
    if opt.label == "Nothing":
        return [0]
    if opt.choices is not None and not csv_mode and vals_dropdown is not None:
        valslist = vals_dropdown
    elif opt.prepare is not None:
        valslist = opt.prepare(vals)
    else:
        valslist = csv_string_to_list_strip(vals)
    valslist = [opt.type(x) for x in valslist if not (isinstance(x, str) and x.strip() == "")]
    if opt.confirm:
        opt.confirm(p, valslist)
    return valslist


def run_axis(p, label, vals, vals_dropdown=None):
    """One axis of a plot: the values parsed and confirmed, then one process_images per cell."""
    opt = next(o for o in axis_options if o.label == label)
    xs = process_axis(p, opt, vals, vals_dropdown)
    results = []
    for x in xs:
        pc = copy(p)  # shallow, as in the real cell(): extra_generation_params is shared between cells
        pc.styles = pc.styles[:]
        pc.fake_latents = []
        opt.apply(pc, x, xs)
        results.append((x, pc, process_images(pc)))
    return results


class Script(scripts.Script):
    def title(self):
        return "X/Y/Z plot"

    def ui(self, is_img2img):
        return []

    def show(self, is_img2img):
        return True
