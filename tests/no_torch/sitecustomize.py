"""On PYTHONPATH (tests/torchless.py), this makes `import torch` fail in that process, as on a
machine without the test extras: transformers, which looks before it imports, then sees no torch."""
import sys

sys.modules["torch"] = None
