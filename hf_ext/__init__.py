"""hf_ext: research architectures and training stages that plug into transformers, TRL and PEFT.

Importing the package must stay cheap: architectures register themselves with the Auto classes here
(lazily importing nothing heavier than their configuration modules).
"""

__version__ = "0.1.0"
