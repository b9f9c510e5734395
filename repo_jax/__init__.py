"""repo_jax: align language models with iREPO and LPO in JAX/Flax.

Modules follow the data flow of DESIGN.md:
``sampling -> annotators -> preferences -> logprobs -> losses -> training``.
"""

__version__ = "0.1.0"
