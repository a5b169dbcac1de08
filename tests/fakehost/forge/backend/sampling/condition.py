# Fake of backend/sampling/condition.py (stable-diffusion-webui-forge dfdcbab6).
# Kept: Condition/ConditionCrossAttn (process_cond, can_concat, concat), compile_conditions,
# compile_weighted_conditions (one cond entry per AND sub-prompt), the dict conds of SDXL and Flux ('crossattn' and
# 'vector', the latter becoming the model's y, and Flux's distilled 'guidance').
import math

import torch


def repeat_to_batch_size(tensor, batch_size):
    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    elif tensor.shape[0] < batch_size:
        return tensor.repeat([math.ceil(batch_size / tensor.shape[0])] + [1] * (len(tensor.shape) - 1))[:batch_size]
    return tensor


class Condition:
    def __init__(self, cond):
        self.cond = cond

    def _copy_with(self, cond):
        return self.__class__(cond)

    def process_cond(self, batch_size, device, **kwargs):
        return self._copy_with(repeat_to_batch_size(self.cond, batch_size).to(device))

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def concat(self, others):
        return torch.cat([self.cond] + [x.cond for x in others])


class ConditionCrossAttn(Condition):
    pass


def compile_conditions(cond):
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return [dict(cross_attn=cond, model_conds=dict(c_crossattn=ConditionCrossAttn(cond)))]
    cross_attn, pooled_output = cond['crossattn'], cond['vector']
    result = dict(cross_attn=cross_attn, pooled_output=pooled_output,
                  model_conds=dict(c_crossattn=ConditionCrossAttn(cross_attn), y=Condition(pooled_output)))
    if 'guidance' in cond:
        result['model_conds']['guidance'] = Condition(cond['guidance'])
    return [result]


def compile_weighted_conditions(cond, weights):
    transposed = list(map(list, zip(*weights)))
    results = []
    for cond_pre in transposed:
        current_indices = []
        current_weight = 0
        for i, w in cond_pre:
            current_indices.append(i)
            current_weight = w
        feed = cond.advanced_indexing(current_indices) if hasattr(cond, 'advanced_indexing') else cond[current_indices]
        h = compile_conditions(feed)
        h[0]['strength'] = current_weight
        results += h
    return results
