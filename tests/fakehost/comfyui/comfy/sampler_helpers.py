# Fake of comfy/sampler_helpers.py (ComfyUI 0.30.0): prepare_sampling loads the patcher (load_models_gpu) and hands
# back its BaseModel; prepare_model_patcher copies the patcher's wrappers and callbacks into the run's
# transformer_options, where apply_model and the samplers find them. Simplified: no hooks, no additional models.
import comfy.model_management
import comfy.patcher_extension


def prepare_sampling(model, noise_shape, conds, model_options=None, force_full_load=False, force_offload=False):
    comfy.model_management.load_models_gpu([model] + model.get_nested_additional_models())
    return model.model, conds, []


def prepare_model_patcher(model, conds, model_options):
    options = model_options["transformer_options"]
    comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), model.wrappers, copy_dict1=False)
    comfy.patcher_extension.merge_nested_dicts(options.setdefault("callbacks", {}), model.callbacks,
                                               copy_dict1=False)


def cleanup_models(conds, models):
    pass
