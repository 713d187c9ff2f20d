"""spjax: self-play fine-tuning of causal LMs in JAX/Flax."""
from spjax.config import ModelConfig
from spjax.hf import load_pretrained, load_tokenizer, save_pretrained
from spjax.model import forward

__all__ = ["ModelConfig", "forward", "load_pretrained", "load_tokenizer", "save_pretrained"]


def __getattr__(name):  # later parts import lazily so `import spjax` stays light
    if name == "sequence_logprobs":
        from spjax.logprobs import sequence_logprobs
        return sequence_logprobs
    if name == "sample":
        from spjax.sampler import sample
        return sample
    if name in ("objectives", "sharding", "model", "hf", "sampler", "data", "step", "logprobs"):
        import importlib
        return importlib.import_module(f"spjax.{name}")
    raise AttributeError(f"module 'spjax' has no attribute {name!r}")
