# Follows modules/generation_parameters_copypaste.py of AUTOMATIC1111 v1.10.1 (82a973c0): an alias kept for
# extensions written before 1.8.
from modules.infotext_utils import *  # noqa: F403 - the real alias re-exports everything
