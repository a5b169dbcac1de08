# Fake of modules/sd_models.py (stable-diffusion-webui-forge dfdcbab6): model_data.get_sd_model and the reload
# hook the batch loop calls. Simplified: the model is whatever the harness put in shared.sd_model.
from modules import shared


class ModelData:
    def get_sd_model(self):
        return shared.sd_model


model_data = ModelData()


def forge_model_reload():
    return shared.sd_model
