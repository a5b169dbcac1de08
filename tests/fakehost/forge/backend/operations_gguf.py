# Fake of backend/operations_gguf.py and packages_3rdparty/gguf/quants.py (stable-diffusion-webui-forge dfdcbab6).
# Kept: ParameterGGUF, an nn.Parameter holding the quantised blocks as uint8 whose `shape` is the layer's real shape
# (real_shape), with gguf_cls, computation_dtype and baked; .to() gives a new ParameterGGUF on the moved data (so a
# backup keeps the old blocks when a merge re-quantises the parameter); dequantize_tensor (a plain tensor passes
# through); a quant class's dequantize_pytorch(parameter) -> the weight in the parameter's computation dtype and
# quantize_pytorch(weight, parent), which sets the parent's data to new blocks (Forge's "low bit LoRA").
# Simplified: one quant type, Q8_0 (blocks of 32 values: an fp16 scale, 32 int8), no GGUF file reading; computation
# in float32 when the model computes in float32.
import torch

BLOCK, TYPE_SIZE = 32, 34


class Q8_0:
    @classmethod
    def quantize_blocks_pytorch(cls, weight):
        blocks = weight.float().reshape(-1, BLOCK)
        scale = (blocks.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(1e-12).to(torch.float16)
        values = torch.round(blocks / scale.float()).clamp(-127, 127).to(torch.int8)
        return torch.cat([scale.view(torch.uint8), values.view(torch.uint8)], dim=-1).contiguous()

    @classmethod
    def dequantize_pytorch(cls, x):
        scale, values = x.data[:, :2], x.data[:, 2:]
        weight = scale.contiguous().view(torch.float16).float() * values.contiguous().view(torch.int8).float()
        return weight.reshape(x.real_shape).to(x.computation_dtype)

    @classmethod
    def quantize_pytorch(cls, data, parent):
        parent.data = cls.quantize_blocks_pytorch(data)
        return parent

    @classmethod
    def bake(cls, parameter):
        parameter.baked = True


class ParameterGGUF(torch.nn.Parameter):
    def __new__(cls, blocks, real_shape=None, computation_dtype=torch.float16):
        return super().__new__(cls, blocks, requires_grad=False)

    def __init__(self, blocks, real_shape=None, computation_dtype=torch.float16):
        super().__init__()
        self.gguf_cls = Q8_0
        self.real_shape = torch.Size(real_shape)
        self.computation_dtype = computation_dtype
        self.baked = True

    @property
    def shape(self):
        return self.real_shape

    @classmethod
    def quantized(cls, weight, computation_dtype):
        return cls(Q8_0.quantize_blocks_pytorch(weight), weight.shape, computation_dtype)

    def to(self, *args, **kwargs):
        return ParameterGGUF(self.data.to(*args, **kwargs), self.real_shape, self.computation_dtype)


def dequantize_tensor(tensor):
    if tensor is None or getattr(tensor, "gguf_cls", None) is None:
        return tensor
    return tensor.gguf_cls.dequantize_pytorch(tensor)
