"""LoRA adapters (Hu et al., 2021) on the layers' projections, in the project's own matmul path.

An adapted projection computes ``x W + (alpha / rank) * dropout(x) A B`` (``layers.project``):
``A`` spans ``W``'s input dimensions and the rank ``J``, ``B`` the rank and ``W``'s output
dimensions, both float32 whatever the base's dtype; ``A`` starts small and random (PEFT's
``kaiming_uniform(a=sqrt(5))``: uniform in ``+-1/sqrt(fan_in)``), ``B`` at zero, so the adapted
model starts exactly equal to the base. The adapters sit in ``model.lora[name]["a" | "b"]`` as
``nnx.LoRAParam``s, stacked over layers like the base (``[L, *in, J]`` and ``[L, J, *out]``),
with logical axis names ``A``: the base's input names + ``lora_rank``, ``B``: ``lora_rank`` + its
output names, so every mesh layout shards them like their weight.

Why not qwix (qwix was not installed or run here; this is from its documented mechanism): qwix
intercepts ``dot_general`` / ``einsum`` calls inside NNX modules and recognises the weight
operand among the module's ``nnx.Param``s. Here the layers' weights are stacked and sliced
inside a ``lax.scan`` (one compiled layer for 32) and every matmul is a ``custom_vjp``
(``layers.matmul``), so the operand it would see is a scan slice, not a Param, and an adapter
it attached would be closed over by the ``custom_vjp`` rather than differentiated. Two einsums
beside each weight do the same job in the existing path, and keep the ``custom_vjp``'s
precision contract (QLoRA, qwix's other offer, is not provided).

The train state splits ``LoRAParam`` (trained) from ``Param`` (the frozen base): see
``training.state.split_model``. For decoding and export the adapters are folded into the
weights (:func:`merge`), so sampling costs what the base costs; :func:`save_peft` writes the
adapters as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained(base, folder)`` loads.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from repo_jax import sharding as shd
from repo_jax.models.config import LoraConfig, ModelConfig
from repo_jax.models.spec import ParamSpec

PRESETS = {
    "all-linear": r"wq|wk|wv|wo|w_gate|w_up|w_down|w_fc1|w_fc2",
    "attention": r"wq|wk|wv|wo",
}


def _layer_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """One layer's parameter specs (``model.param_specs``' first half, without importing it)."""
    from repo_jax.models import mistral, phi

    return {"mistral": mistral, "phi": phi}[cfg.arch].layer_specs(cfg)


def _module(spec: ParamSpec) -> str:
    """``self_attn.q_proj.weight`` -> ``self_attn.q_proj`` (the HF / PEFT module name)."""
    return spec.hf_name.removesuffix(".weight")


def target_names(cfg: ModelConfig) -> list[str]:
    """The layer parameters ``cfg.lora.targets`` adapts (in spec order); an error names a pattern
    that matches nothing."""
    layer = _layer_specs(cfg)
    linear = {n: s for n, s in layer.items() if s.hf_in_dims}
    out = []
    for pattern in cfg.lora.targets:
        regex = re.compile(PRESETS.get(pattern, pattern))
        hit = [n for n, s in linear.items() if regex.fullmatch(n) or regex.fullmatch(_module(s))]
        if not hit:
            raise ValueError(f"model.lora.targets: {pattern!r} matches no projection of a {cfg.arch} layer "
                             f"(names: {', '.join(f'{n} ({_module(s)})' for n, s in linear.items())})")
        out += [n for n in hit if n not in out]
    return [n for n in linear if n in out]


def adapter_specs(cfg: ModelConfig) -> dict[str, tuple[ParamSpec, ParamSpec]]:
    """``name -> (spec of A, spec of B)`` per layer (without the ``layers`` axis)."""
    layer = _layer_specs(cfg)
    r, out = cfg.lora.rank, {}
    for name in target_names(cfg):
        s = layer[name]
        i = s.hf_in_dims
        a = ParamSpec((*s.shape[:i], r), (*s.names[:i], "lora_rank"), "normal", f"{_module(s)}.lora_A.weight")
        b = ParamSpec((r, *s.shape[i:]), ("lora_rank", *s.names[i:]), "zeros", f"{_module(s)}.lora_B.weight")
        out[name] = (a, b)
    return out


def param_count(cfg: ModelConfig) -> int:
    """Adapter parameters of the whole model (0 when LoRA is off)."""
    if not cfg.lora.rank:
        return 0
    return cfg.num_layers * sum(math.prod(a.shape) + math.prod(b.shape) for a, b in adapter_specs(cfg).values())


def init_a(key, shape):
    """``A``'s initial values: uniform in ``+-1/sqrt(fan_in)`` (PEFT's default), float32."""
    bound = 1.0 / math.sqrt(math.prod(shape[1:-1]))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def make_adapters(cfg: ModelConfig, key) -> nnx.Dict:
    """Fresh adapters for every target, stacked over layers (``B`` zero)."""
    params = {}
    for i, (name, (a, b)) in enumerate(adapter_specs(cfg).items()):
        n = cfg.num_layers
        params[name] = nnx.Dict({
            "a": nnx.LoRAParam(init_a(jax.random.fold_in(key, i), (n, *a.shape)), eager_sharding=False,
                               out_sharding=("layers", *a.names)),
            "b": nnx.LoRAParam(jnp.zeros((n, *b.shape), jnp.float32), eager_sharding=False,
                               out_sharding=("layers", *b.names)),
        })
    return nnx.Dict(params)


def layer_adapters(model) -> dict:
    """The stacked adapter arrays ``{name: {"a", "b"}}`` of ``model`` (empty without LoRA)."""
    lora = getattr(model, "lora", None)
    return {} if lora is None else {n: {"a": d["a"][...], "b": d["b"][...]} for n, d in lora.items()}


def add_adapters(model, lora: LoraConfig, *, seed: int = 0, mesh=None, rules=None):
    """A model sharing ``model``'s base arrays with fresh adapters (``lora``), placed by their
    logical names on ``mesh`` (training rules by default); ``model`` itself is unchanged."""
    if not lora.rank:
        return model
    if model.config.lora.rank:
        raise ValueError("the model already has LoRA adapters")
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, state)  # a new module over the same arrays
    out.config = model.config.replace(lora=lora)
    if mesh is None:
        out.lora = make_adapters(out.config, jax.random.key(seed))
        return out
    abstract = nnx.eval_shape(lambda: make_adapters(out.config, jax.random.key(seed)))
    shardings = shd.state_shardings(nnx.state(abstract), mesh, rules or shd.TRAIN_RULES)
    ad_graph, _ = nnx.split(abstract)
    state = jax.jit(lambda: nnx.state(make_adapters(out.config, jax.random.key(seed))), out_shardings=shardings)()
    out.lora = nnx.merge(ad_graph, state)
    return out


def merged_weight(w, a, b, scale: float):
    """``W + scale * A B`` for stacked ``w`` ``[L, *in, *out]``, ``a`` ``[L, *in, J]``, ``b``
    ``[L, J, *out]``, in float32, returned in ``w``'s dtype."""
    n, r = a.shape[0], a.shape[-1]
    a_LxIxJ, b_LxJxO = a.reshape(n, -1, r), b.reshape(n, r, -1)
    delta = jnp.einsum("LIJ,LJO->LIO", a_LxIxJ.astype(jnp.float32), b_LxJxO.astype(jnp.float32))
    return (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)


def merged_layers(cfg: ModelConfig, layers: dict, adapters: dict) -> dict:
    """The layer weights with every adapter folded in (a pure function: call it under ``jit``)."""
    out = dict(layers)
    for name, ad in adapters.items():
        out[name] = merged_weight(layers[name], ad["a"], ad["b"], cfg.lora.scale)
    return out


# one compiled fold per (config, shapes, shardings): the loop merges once a round without recompiling
_merged_layers = jax.jit(merged_layers, static_argnums=0)


def merge(model):
    """The same model without adapters, each adapted weight replaced by ``W + scale * A B`` (one
    jitted fold, in the weight's dtype and sharding; the other weights are shared, not copied).
    What sampling and the HF export use. A model without adapters is returned as is."""
    if not model.config.lora.rank:
        return model
    cfg = model.config
    plain = cfg.replace(lora=LoraConfig())
    adapters = layer_adapters(model)
    weights = {n: model.layers[n][...] for n in adapters}
    shardings = {n: w.sharding for n, w in weights.items()}
    folded = jax.device_put(_merged_layers(cfg, weights, adapters), shardings)  # a no-op where XLA kept W's layout
    graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: type(model)(plain, rngs=nnx.Rngs(0))))
    values = {("top", k): v[...] for k, v in model.top.items()}
    values.update({("layers", k): folded.get(k, v[...]) for k, v in model.layers.items()})
    flat = [(path, var.replace(values[path])) for path, var in nnx.to_flat_state(abs_state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ------------------------------------------------------------------------------ base checksum


def checksum(tree) -> str:
    """An exact fingerprint of every array in ``tree`` (the frozen base), independent of how the
    arrays are sharded: per array, the wrapping uint32 sum of ``bits(x_i) * (2 i + 1)`` over the
    flat index ``i`` (integer sums do not depend on the reduction order), then hashed with the
    shapes and dtypes on the host. A resumed LoRA run compares it with the saved one."""
    import hashlib

    leaves = jax.tree.leaves(tree)

    def one(x):
        bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        u = jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)
        idx = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
        return jnp.sum(u * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)

    sums = np.asarray(jax.device_get(jax.jit(lambda xs: [one(x) for x in xs])(leaves)), np.uint32)
    h = hashlib.sha256()
    for x, s in zip(leaves, sums):
        h.update(f"{x.shape}{x.dtype}{int(s)};".encode())
    return h.hexdigest()[:32]


# ------------------------------------------------------------------------------ PEFT export

_PEFT_PREFIX = "base_model.model.model.layers"


def save_peft(model, path, *, base_model: str = "") -> Path:
    """Writes ``model``'s adapters as a PEFT LoRA folder: ``adapter_config.json`` and
    ``adapter_model.safetensors`` (``base_model.model.model.layers.{i}.<module>.lora_A.weight``
    ``[J, in]`` and ``lora_B.weight`` ``[out, J]``, float32), which
    ``peft.PeftModel.from_pretrained(base, path)`` loads onto the HF base model. ``base_model``
    goes to ``base_model_name_or_path``."""
    from repo_jax.models import safetensors_io

    cfg = model.config
    if not cfg.lora.rank:
        raise ValueError("the model has no LoRA adapters to export (model.lora.rank is 0)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specs = adapter_specs(cfg)
    items = []
    for name, (sa, sb) in specs.items():
        a = np.asarray(jax.device_get(model.lora[name]["a"][...]), np.float32)
        b = np.asarray(jax.device_get(model.lora[name]["b"][...]), np.float32)
        r = cfg.lora.rank
        for i in range(cfg.num_layers):
            a_JxI = a[i].reshape(-1, r).T
            b_OxJ = b[i].reshape(r, -1).T
            items.append((f"{_PEFT_PREFIX}.{i}.{sa.hf_name}", a_JxI.shape, np.dtype(np.float32), lambda x=a_JxI: x))
            items.append((f"{_PEFT_PREFIX}.{i}.{sb.hf_name}", b_OxJ.shape, np.dtype(np.float32), lambda x=b_OxJ: x))
    safetensors_io.write_file(path / "adapter_model.safetensors", items)
    layer = _layer_specs(cfg)
    modules = sorted({_module(layer[n]).split(".")[-1] for n in specs})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.lora.rank,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def load_peft(model, path, *, mesh=None, rules=None):
    """``model`` (a base without adapters) with the PEFT LoRA folder ``path`` on it: ours
    (:func:`save_peft`) or any ``peft`` ``save_pretrained`` of a Llama / Mistral / Phi LoRA
    (``adapter_config.json`` + ``adapter_model.safetensors``; plain LoRA only: no rsLoRA, DoRA,
    biases or ``modules_to_save``). Every tensor is checked: a missing, unexpected or mis-shaped
    one is an error naming the file and tensor (PEFT itself only warns and leaves ``B`` at zero)."""
    from repo_jax.models import safetensors_io

    path = Path(path)
    where = path / "adapter_config.json"
    pc = json.loads(where.read_text())
    if pc.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {pc.get('peft_type')!r} is not LORA")
    for key, plain in (("use_rslora", False), ("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if pc.get(key, plain) != plain:
            raise ValueError(f"{where}: {key}={pc[key]!r} is not supported (plain LoRA only)")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern"):
        if pc.get(key):
            raise ValueError(f"{where}: {key} is not supported (plain LoRA only)")
    layer = _layer_specs(model.config)
    linear = {_module(s).split(".")[-1]: n for n, s in layer.items() if s.hf_in_dims}
    modules = pc.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else modules
    unknown = [m for m in modules if m not in linear]
    if unknown:
        raise ValueError(f"{where}: target module {unknown[0]!r} is not a projection of a {model.config.arch} layer "
                         f"(one of {sorted(linear)})")
    lora = LoraConfig(rank=int(pc["r"]), alpha=float(pc.get("lora_alpha", 8)),
                      targets=tuple(linear[m] for m in modules), dropout=float(pc.get("lora_dropout", 0.0)))
    out = add_adapters(model, lora, mesh=mesh, rules=rules)
    file = path / "adapter_model.safetensors"
    source = safetensors_io.SafetensorsFile(file)
    present = {n.replace(".default.", "."): n for n in source.names()}
    cfg, r = out.config, lora.rank
    expected = set()
    for name, (sa, sb) in adapter_specs(cfg).items():
        w = layer[name]
        n_in, n_out = math.prod(w.shape[:w.hf_in_dims]), math.prod(w.shape[w.hf_in_dims:])
        stacks = {"a": [], "b": []}
        for i in range(cfg.num_layers):
            for kind, spec, shape in (("a", sa, (r, n_in)), ("b", sb, (n_out, r))):
                tname = f"{_PEFT_PREFIX}.{i}.{spec.hf_name}"
                expected.add(tname)
                if tname not in present:
                    raise ValueError(f"{file}: missing tensor {tname}")
                got = source.get(present[tname])
                if tuple(got.shape) != shape:
                    raise ValueError(f"{file}: tensor {tname} has shape {tuple(got.shape)}, expected {shape}")
                stacks[kind].append(np.asarray(got, np.float32).T.reshape(spec.shape))
        for kind in ("a", "b"):
            var = out.lora[name][kind]
            var[...] = jax.device_put(np.stack(stacks[kind]), var[...].sharding)
    unexpected = sorted(set(present) - expected)
    if unexpected:
        raise ValueError(f"{file}: unexpected tensor {unexpected[0]} (not an adapter of the targets {modules})")
    return out
