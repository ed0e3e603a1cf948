"""Turning text into audio with diffusers' `AceStepPipeline`: prompts (prompts.py) and the renderer (render.py).

This layer sits beside training, below it: `training/sampling.py` renders samples during a run and
`training/generate.py` (`sidestep generate`) renders with a saved adapter; both use it, never the reverse.
"""

from sidestep.generation.prompts import MAX_DURATION_S, PromptDefaults, SamplePrompt, make_prompt, read_prompts
from sidestep.generation.render import Renderer, RenderSettings, resolve_settings, write_wav

__all__ = ["MAX_DURATION_S", "PromptDefaults", "SamplePrompt", "make_prompt", "read_prompts", "Renderer",
           "RenderSettings", "resolve_settings", "write_wav"]
