"""Checkpoint conversion: HF folders (safetensors) and GGUF files -> our models, and back.

Loading never holds two copies of the model on the host: the abstract model comes from
``nnx.eval_shape``, and every parameter is built with ``jax.make_array_from_callback``, which
asks for exactly the slice each device holds, read from a memory-mapped safetensors view (or
one dequantised GGUF tensor). A stacked layer parameter reads its ``L`` HF tensors one by one.
No torch, no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401 -- registers bfloat16 with numpy
import numpy as np
from flax import nnx

from repo_jax import sharding as shd
from repo_jax.assets import resolve_model_path
from repo_jax.models import gguf_io, safetensors_io
from repo_jax.models.config import ModelConfig, from_hf_dict, to_hf_dict
from repo_jax.models.model import CausalLM, param_specs
from repo_jax.models.spec import ParamSpec

# Tensors some checkpoints carry that hold no parameters of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def layer_hf_name(spec: ParamSpec, layer: int) -> str:
    return f"model.layers.{layer}.{spec.hf_name}"


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> HF shape, for every tensor ``cfg`` needs."""
    layer, top = param_specs(cfg)
    out = {s.hf_name: s.hf_shape() for s in top.values()}
    for i in range(cfg.num_layers):
        out.update({layer_hf_name(s, i): s.hf_shape() for s in layer.values()})
    return out


def _check(source, cfg: ModelConfig, where: str) -> None:
    """One clear error for a missing, unexpected or mis-shaped tensor."""
    expected = expected_tensors(cfg)
    present = set(source.names())
    missing = sorted(set(expected) - present)
    if missing:
        raise ValueError(f"{where}: missing tensor {missing[0]} (and {len(missing) - 1} more)" if len(missing) > 1
                         else f"{where}: missing tensor {missing[0]}")
    tied_head = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(n for n in present - set(expected) - tied_head if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(f"{where}: unexpected tensor {unexpected[0]} (not used by a {cfg.hf_model_type} model with this config)")
    for name, shape in expected.items():
        got = tuple(source.shape(name))
        if got != tuple(shape):
            raise ValueError(f"{where}: tensor {name} has shape {got}, the config implies {tuple(shape)}")


def _place(source, spec: ParamSpec, stacked_layers: int | None, dtype, sharding):
    """One parameter as a (possibly sharded) jax.Array, reading only the slices each device holds."""
    np_dtype = np.dtype(dtype)
    if stacked_layers is None:
        shape = spec.shape

        def cb(idx):
            return np.asarray(spec.from_hf(source.get(spec.hf_name))[idx], dtype=np_dtype)
    else:
        shape = (stacked_layers, *spec.shape)

        def cb(idx):
            rows = range(stacked_layers)[idx[0]]
            return np.stack([np.asarray(spec.from_hf(source.get(layer_hf_name(spec, i)))[idx[1:]], dtype=np_dtype)
                             for i in rows])

    return jax.make_array_from_callback(shape, sharding, cb)


def load_config(path: str | Path, **overrides) -> ModelConfig:
    """A ``ModelConfig`` from a ``config.json``, an HF folder holding one, a ``.gguf`` file, or
    the alias ``smollm2``. ``overrides`` replace fields (e.g. ``dtype="bfloat16"``, ``remat="full"``)."""
    path = resolve_model_path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return gguf_io.read_config(path).replace(**overrides)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist (expected an HF config.json, a folder holding one, or a .gguf)")
    return from_hf_dict(json.loads(file.read_text()), where=str(file), **overrides)


def from_pretrained(path, *, dtype=jnp.float32, compute_dtype=None, mesh=None, rules=None, **overrides) -> CausalLM:
    """Loads an HF folder (``config.json`` + safetensors, single or sharded), a ``.gguf`` file
    (Llama architecture, dequantised), the alias ``smollm2``, or a PEFT LoRA adapter folder
    (``adapter_config.json``: its ``base_model_name_or_path`` with the adapters on it,
    ``lora.load_peft``).

    Args:
      dtype: parameter dtype; ``compute_dtype`` defaults to it.
      mesh, rules: place each parameter directly with the sharding its logical axis names get
        under ``rules`` (default: the training layout); without a mesh, on the default device.
      overrides: other ``ModelConfig`` fields (e.g. ``remat="full"``); ``lora`` (a
        ``LoraConfig``) adds fresh adapters on the loaded base (``lora.add_adapters``).
    """
    from repo_jax.models import lora as lora_lib

    adapters = overrides.pop("lora", None)
    if adapters is not None and adapters.rank:
        return lora_lib.add_adapters(from_pretrained(path, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh,
                                                     rules=rules, **overrides), adapters, mesh=mesh, rules=rules)
    path = resolve_model_path(path)
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        if not base:
            raise ValueError(f"{path / 'adapter_config.json'}: a PEFT adapter folder without base_model_name_or_path; "
                             "load its base, then repo_jax.models.lora.load_peft(base, folder)")
        model = from_pretrained(base, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh, rules=rules, **overrides)
        return lora_lib.load_peft(model, path, mesh=mesh, rules=rules)
    dt = _dtype_name(dtype)
    cfg = load_config(path, param_dtype=dt, dtype=_dtype_name(compute_dtype or dtype), **overrides)
    if path.suffix != ".gguf" and not path.is_dir():
        raise FileNotFoundError(f"{path} is not an HF checkpoint folder or a .gguf file")
    source = gguf_io.GGUFTensors(path, cfg) if path.suffix == ".gguf" else safetensors_io.SafetensorsFolder(path)
    _check(source, cfg, str(path))

    rules = rules if rules is not None else shd.TRAIN_RULES
    abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    layer, top = param_specs(cfg)
    placed = []
    for (group, name), var in nnx.to_flat_state(abs_state):
        spec, stacked = (layer[name], cfg.num_layers) if group == "layers" else (top[name], None)
        sharding = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None
                    else shd.logical_sharding(var.get_metadata()["out_sharding"], var.shape, mesh, rules))
        placed.append(((group, name), var.replace(_place(source, spec, stacked, dt, sharding))))
    return nnx.merge(graphdef, nnx.from_flat_state(placed))


def save_pretrained(model: CausalLM, path, *, dtype=None, max_shard_bytes: int = 4 << 30) -> Path:
    """Writes ``config.json`` + safetensors that ``transformers.AutoModelForCausalLM`` loads.

    Parameters are fetched one at a time (a stacked layer parameter, then split per layer), so
    the host holds one parameter at a time. ``dtype`` defaults to the parameter dtype. LoRA
    adapters are merged into their weights first (``lora.merge``).
    """
    from repo_jax.models import lora as lora_lib

    model = lora_lib.merge(model)
    cfg = model.config
    out_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layer, top = param_specs(cfg)
    fetched: dict[str, np.ndarray] = {}

    def stacked(name):
        if name not in fetched:
            fetched.clear()  # keep one stacked parameter on the host at a time
            fetched[name] = np.asarray(jax.device_get(model.layers[name][...]))
        return fetched[name]

    items = [(s.hf_name, s.hf_shape(), out_dtype, lambda n=n, s=s: s.to_hf(np.asarray(jax.device_get(model.top[n][...]))))
             for n, s in top.items()]
    for n, s in layer.items():  # grouped by parameter, so each stacked array is fetched once
        items += [(layer_hf_name(s, i), s.hf_shape(), out_dtype, lambda n=n, s=s, i=i: s.to_hf(stacked(n)[i]))
                  for i in range(cfg.num_layers)]
    safetensors_io.write_folder(path, items, max_shard_bytes=max_shard_bytes)
    hf = to_hf_dict(cfg.replace(param_dtype=out_dtype.name))
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    return path
