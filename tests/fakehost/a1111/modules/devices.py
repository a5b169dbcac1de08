# Follows modules/devices.py of AUTOMATIC1111 v1.10.1 (82a973c0), as on a CPU run with --no-half.
import contextlib

import torch

cpu = torch.device("cpu")
device = device_interrogate = device_gfpgan = device_esrgan = device_codeformer = cpu
dtype = dtype_vae = dtype_unet = dtype_inference = torch.float32
unet_needs_upcast = False
fp8 = False


def cond_cast_unet(input):
    return input.to(dtype_unet) if unet_needs_upcast else input


def cond_cast_float(input):
    return input.float() if unet_needs_upcast else input


def autocast(disable=False):
    # fp32 on CPU: the real host returns a null context too.
    return contextlib.nullcontext()


def without_autocast(disable=False):
    return contextlib.nullcontext()


def torch_gc():
    pass


def test_for_nans(x, where):
    if torch.isnan(x[(0,) * x.dim()]).item():
        raise NansException(f"A tensor with NaNs was produced in {where}.")


class NansException(Exception):
    pass
