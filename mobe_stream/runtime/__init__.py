"""Runtime: plain-torch decoders for original and MoBE checkpoints, device map, offload, generate, eval."""

from .device_map import format_plan, parse_max_memory, plan_device_map
from .eval import perplexity
from .generate import GenerationResult, generate, sample_next
from .mobe_experts import MixedBasisCache
from .model import MoEModel, load_model
from .tokenizer import Tokenizer

__all__ = ["format_plan", "parse_max_memory", "plan_device_map", "perplexity", "GenerationResult", "generate",
           "sample_next", "MixedBasisCache", "MoEModel", "load_model", "Tokenizer"]
