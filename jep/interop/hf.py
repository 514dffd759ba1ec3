"""HuggingFace-layout MoE checkpoints (a directory of config.json and safetensors shards) to
jep's `MoEConfig` and `jep.moe` params, and back.

    from jep.interop import hf
    info, layers = hf.load("path/to/model", mesh=mesh)   # layers: {layer index: params}
    y, aux = jep.moe(x, layers[info.moe_layers[0]], config=info.config, mesh=mesh)
    hf.save("path/to/copy", layers, source="path/to/model")

The architectures (config.json's `model_type`) and their MoE tensors in layer i, HF's names:
  mixtral      model.layers.{i}.block_sparse_moe.gate.weight [E, H],
               ...experts.{j}.w1 / w3 / w2.weight (gate [F, H], up [F, H], down [H, F])
  qwen2_moe    model.layers.{i}.mlp.gate.weight, ...mlp.experts.{j}.gate_proj / up_proj /
               down_proj.weight, the shared expert mlp.shared_expert.*_proj.weight [F_s, H] and
               its gate mlp.shared_expert_gate.weight [1, H]
  qwen3_moe    model.layers.{i}.mlp.gate.weight, mlp.experts.{j}.*_proj.weight
  deepseek_v3  model.layers.{i}.mlp.gate.weight and gate.e_score_correction_bias [E],
               mlp.experts.{j}.*_proj.weight, mlp.shared_experts.*_proj.weight
Each may hold its experts as transformers 5 does instead, fused under `mlp.`:
experts.gate_up_proj [E, 2F, H] (the gate's F rows first) and experts.down_proj [E, H, F].
HF's weights are [out, in]; jep's are [in, out] (router [H, E], w_gate [E, H, F]), so each is
transposed on the way. Which layout a checkpoint uses is read from its tensor names, and `save`
writes the layout it read.

Tensors are read with safetensors' numpy API (no torch), lazily: on a mesh each expert array is
made with `jax.make_array_from_callback`, so a process reads only the expert rows its devices
hold. Expert weights keep the checkpoint's dtype (bf16 stays bf16); the router and the
selection bias are float32, as `jep.moe` keeps them.

DeepSeek-V3's released weights are FP8: each expert weight (shared experts too) is e4m3 with a
`weight_scale_inv` tensor of float32 scales, one per 128 x 128 block. `load` dequantizes them to
bf16 (`jep.fp8.dequantize_blocks`); `save` writes them back in FP8 with fresh block scales
(`jep.fp8.quantize_blocks`), so an FP8 checkpoint round-trips within e4m3's rounding, not bit
for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

from jep import fp8
from jep.config import DispatchConfig, MoEConfig
from jep.moe import EXPERT_PARAMS

ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}
_RAW_DTYPES = ("F8_E4M3", "F8_E5M2")  # read from their bytes (`_Tensors._read_raw`)
_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
# The MoE block's own tensors, under its prefix: anything else there is not ours to read.
_MOE_PARTS = ("gate.", "experts.", "shared_expert.", "shared_experts.", "shared_expert_gate.")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What config.json says about a checkpoint's MoE layers.

    Attributes:
      architecture: one of `ARCHITECTURES`.
      config: the `MoEConfig` of every MoE layer (routing as the model routes).
      hidden: H. ffn: F, each routed expert's intermediate size.
      shared_ffn: F_s, the shared expert's intermediate size, or None without one.
      moe_layers: indices of the decoder layers whose MLP is the MoE block, ascending
        (DeepSeek-V3's multi-token-prediction layers, numbered after the decoder's, where the
        checkpoint holds them: `load` and `save` drop those it lacks).
      num_layers: the decoder's layers (config.json's num_hidden_layers).
    """

    architecture: str
    config: MoEConfig
    hidden: int
    ffn: int
    shared_ffn: int | None
    moe_layers: tuple[int, ...]
    num_layers: int


def _require(c: dict, key: str, architecture: str):
    if key not in c:
        raise ValueError(f"config.json of a {architecture} model lacks {key!r}")
    return c[key]


def read_config(path: str, *, axis_name="ep", dispatch: DispatchConfig = DispatchConfig()) -> ModelInfo:
    """The `ModelInfo` of the checkpoint directory `path` (its config.json). Keys a config may
    leave out take transformers' defaults; `axis_name` and `dispatch` go into the `MoEConfig`."""
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    arch = c.get("model_type")
    if arch not in ARCHITECTURES:
        raise ValueError(f"config.json's model_type {arch!r} is not an architecture jep reads; "
                         f"known: {ARCHITECTURES}")
    hidden = _require(c, "hidden_size", arch)
    layers = _require(c, "num_hidden_layers", arch)
    top_k = _require(c, "num_experts_per_tok", arch)
    act = c.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json's hidden_act {act!r} is not one of {sorted(_ACTIVATIONS)}")
    routing = {}
    shared_ffn = None
    if arch == "mixtral":
        experts, ffn = _require(c, "num_local_experts", arch), _require(c, "intermediate_size", arch)
        moe_layers = range(layers)
    elif arch in ("qwen2_moe", "qwen3_moe"):
        # transformers 5 writes num_local_experts where the released configs say num_experts.
        experts = c.get("num_experts", c.get("num_local_experts"))
        if experts is None:
            raise ValueError(f"config.json of a {arch} model lacks 'num_experts'")
        ffn = _require(c, "moe_intermediate_size", arch)
        routing["renormalize"] = bool(c.get("norm_topk_prob", False))
        if arch == "qwen2_moe":
            shared_ffn = c.get("shared_expert_intermediate_size", 5632) or None
        step, dense = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers") or ())
        moe_layers = [i for i in range(layers) if i not in dense and (i + 1) % step == 0]
    else:  # deepseek_v3; its multi-token-prediction layers follow the decoder's, MoE too
        experts = _require(c, "n_routed_experts", arch)
        ffn = _require(c, "moe_intermediate_size", arch)
        shared_ffn = ffn * c.get("n_shared_experts", 1) or None
        groups = c.get("n_group", 1)
        if groups and groups > 1:
            routing |= {"num_groups": groups, "topk_groups": c.get("topk_group", groups)}
        routing |= {"score": c.get("scoring_func", "sigmoid"),
                    "renormalize": bool(c.get("norm_topk_prob", True)),
                    "routed_scaling_factor": float(c.get("routed_scaling_factor", 2.5))}
        first, freq = c.get("first_k_dense_replace", 3), c.get("moe_layer_freq", 1)
        total = layers + c.get("num_nextn_predict_layers", 0)
        moe_layers = [i for i in range(total) if i >= first and i % freq == 0]
    config = MoEConfig(num_experts=experts, top_k=top_k, activation=_ACTIVATIONS[act],
                       axis_name=axis_name, dispatch=dispatch, **routing)
    return ModelInfo(arch, config, hidden, ffn, shared_ffn, tuple(moe_layers), layers)


def _held(info: ModelInfo, tensors) -> ModelInfo:
    """`info` without the layers past the decoder's (multi-token prediction) the checkpoint lacks."""
    def held(i):
        return i < info.num_layers or f"model.layers.{i}.mlp.gate.weight" in tensors
    return dataclasses.replace(info, moe_layers=tuple(i for i in info.moe_layers if held(i)))


class _Tensors:
    """A checkpoint directory's tensors: name -> shard file, each read lazily (axis 0 sliced by
    safetensors, the rest in numpy: safetensors' numpy API slices bf16 along axis 0 only)."""

    def __init__(self, path: str):
        files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise ValueError(f"{path!r} holds no *.safetensors file")
        self.path, self.files, self.file_of, self._open = path, files, {}, {}
        for file in files:
            for name in self._handle(file).keys():
                self.file_of[name] = file

    def _handle(self, file):
        if file not in self._open:
            self._open[file] = safe_open(os.path.join(self.path, file), framework="numpy")
        return self._open[file]

    def __contains__(self, name):
        return name in self.file_of

    def names_in(self, file):
        return [name for name, f in self.file_of.items() if f == file]

    def metadata(self, file):
        return self._handle(file).metadata()

    def _slice(self, name):
        return self._handle(self.file_of[name]).get_slice(name)

    def shape(self, name) -> tuple:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name):
        return np.dtype(_DTYPES[self._slice(name).get_dtype()])

    def read(self, name, rows: slice = slice(None)) -> np.ndarray:
        if self._slice(name).get_dtype() in _RAW_DTYPES:
            return self._read_raw(name)[rows]
        return self._slice(name)[rows]

    def _read_raw(self, name) -> np.ndarray:
        """A tensor read from its bytes: safetensors' numpy API writes FP8 (ml_dtypes) arrays
        but cannot read them back (it looks for numpy.float8_e4m3fn)."""
        path = os.path.join(self.path, self.file_of[name])
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            entry = json.loads(f.read(size))[name]
            begin, end = entry["data_offsets"]
            f.seek(8 + size + begin)
            data = f.read(end - begin)
        return np.frombuffer(data, _DTYPES[entry["dtype"]]).reshape(entry["shape"]).copy()

    def scale_of(self, name) -> str | None:
        """The block scales' tensor of an FP8 weight (DeepSeek-V3's `weight_scale_inv`), or
        None for a weight in its own dtype."""
        scale = f"{name}_scale_inv"
        if scale in self and self.dtype(name) == np.dtype(ml_dtypes.float8_e4m3fn):
            return scale
        return None

    def param_dtype(self, name):
        """The dtype `load` gives a weight: bf16 for an FP8 one, else the checkpoint's."""
        return np.dtype(ml_dtypes.bfloat16) if self.scale_of(name) else self.dtype(name)

    def weight(self, name) -> np.ndarray:
        """A whole weight [out, in], dequantized to bf16 (q times its 128 x 128 block's scale,
        in float32, rounded once) where the checkpoint holds it in FP8 with block scales."""
        scale = self.scale_of(name)
        if scale is None:
            return self.read(name)
        return np.asarray(fp8.dequantize_blocks(self.read(name), self.read(scale), jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class _Layer:
    """Where one MoE layer's tensors are: HF names of each piece, per the checkpoint's layout."""

    prefix: str                     # "model.layers.3.mlp."
    fused: bool                     # experts.gate_up_proj / experts.down_proj
    projections: tuple[str, str, str]  # per-expert gate, up, down names ("w1", "w3", "w2")
    shared: str | None              # "shared_expert." / "shared_experts." or None
    fp8: bool = False               # expert weights in FP8 with block scales (DeepSeek-V3)

    def expert(self, e, which):
        return f"{self.prefix}experts.{e}.{self.projections[which]}.weight"


def _layer(tensors: _Tensors, info: ModelInfo, i: int) -> _Layer:
    blocks = ("block_sparse_moe", "mlp") if info.architecture == "mixtral" else ("mlp",)
    prefix = next((f"model.layers.{i}.{b}." for b in blocks
                   if f"model.layers.{i}.{b}.gate.weight" in tensors), None)
    if prefix is None:
        raise ValueError(f"the checkpoint lacks tensor 'model.layers.{i}.{blocks[0]}.gate.weight' "
                         f"(config.json makes layer {i} a MoE layer)")
    fused = f"{prefix}experts.gate_up_proj" in tensors
    projections = (("w1", "w3", "w2") if f"{prefix}experts.0.w1.weight" in tensors
                   else ("gate_proj", "up_proj", "down_proj"))
    shared = None
    if info.shared_ffn:
        shared = "shared_expert." if info.architecture == "qwen2_moe" else "shared_experts."
    layer = _Layer(prefix, fused, projections, shared)
    return dataclasses.replace(layer, fp8=not fused and bool(tensors.scale_of(layer.expert(0, 0))))


def _expected(layer: _Layer, info: ModelInfo) -> dict[str, tuple]:
    """HF name -> shape of every tensor of a MoE layer, in the checkpoint's layout."""
    e, h, f, p = info.config.num_experts, info.hidden, info.ffn, layer.prefix
    shapes = {f"{p}gate.weight": (e, h)}
    if info.architecture == "deepseek_v3":
        shapes[f"{p}gate.e_score_correction_bias"] = (e,)
    if layer.fused:
        shapes |= {f"{p}experts.gate_up_proj": (e, 2 * f, h), f"{p}experts.down_proj": (e, h, f)}
    else:
        for j in range(e):
            shapes |= {layer.expert(j, 0): (f, h), layer.expert(j, 1): (f, h),
                       layer.expert(j, 2): (h, f)}
    if layer.shared:
        s = info.shared_ffn
        shapes |= {f"{p}{layer.shared}gate_proj.weight": (s, h),
                   f"{p}{layer.shared}up_proj.weight": (s, h),
                   f"{p}{layer.shared}down_proj.weight": (h, s)}
    if info.architecture == "qwen2_moe":
        shapes[f"{p}shared_expert_gate.weight"] = (1, h)
    if layer.fp8:  # every expert weight (shared ones too) with its block scales
        experts = (f"{p}experts.",) + ((f"{p}{layer.shared}",) if layer.shared else ())
        shapes |= {f"{name}_scale_inv": fp8.block_grid(shape)
                   for name, shape in list(shapes.items()) if name.startswith(experts)}
    return shapes


def _check_tensors(tensors: _Tensors, info: ModelInfo, layers: dict[int, _Layer]) -> None:
    """Every MoE tensor present with its shape; no MoE tensor config.json does not account for."""
    expected = {}
    for layer in layers.values():
        expected |= _expected(layer, info)
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"the checkpoint lacks tensor {name!r}")
        if tensors.shape(name) != shape:
            raise ValueError(f"tensor {name!r} has shape {tensors.shape(name)}, expected {shape} "
                             f"(config.json: E={info.config.num_experts}, H={info.hidden}, "
                             f"F={info.ffn}, F_shared={info.shared_ffn})")
    for name in tensors.file_of:
        parts = name.split(".")
        if (len(parts) > 4 and parts[:2] == ["model", "layers"] and parts[3] in ("mlp", "block_sparse_moe")
                and ".".join(parts[4:]).startswith(_MOE_PARTS) and name not in expected):
            raise ValueError(f"the checkpoint has tensor {name!r} that config.json does not account "
                             f"for (E={info.config.num_experts}, MoE layers {info.moe_layers})")


def _readers(tensors: _Tensors, layer: _Layer, info: ModelInfo) -> dict:
    """param -> (shape, dtype, read(rows: slice) -> rows of the param in jep's layout)."""
    e, h, f, p = info.config.num_experts, info.hidden, info.ffn, layer.prefix
    t = lambda a: np.swapaxes(a, -1, -2)  # noqa: E731 - [out, in] <-> [in, out]
    out = {"router": ((h, e), np.float32,
                      lambda rows: t(tensors.read(f"{p}gate.weight")).astype(np.float32)[rows])}
    if info.architecture == "deepseek_v3":
        bias = f"{p}gate.e_score_correction_bias"
        out["bias"] = ((e,), np.float32, lambda rows: tensors.read(bias, rows).astype(np.float32))
    if layer.fused:
        gate_up, down = f"{p}experts.gate_up_proj", f"{p}experts.down_proj"
        dtype = tensors.dtype(gate_up)
        out |= {"w_gate": ((e, h, f), dtype, lambda rows: t(tensors.read(gate_up, rows)[:, :f])),
                "w_up": ((e, h, f), dtype, lambda rows: t(tensors.read(gate_up, rows)[:, f:])),
                "w_down": ((e, f, h), tensors.dtype(down), lambda rows: t(tensors.read(down, rows)))}
    else:
        def stacked(which):
            def read(rows):
                return np.stack([t(tensors.weight(layer.expert(j, which)))
                                 for j in range(e)[rows]])
            return read
        shapes = ((e, h, f), (e, h, f), (e, f, h))
        for which, param in enumerate(("w_gate", "w_up", "w_down")):
            out[param] = (shapes[which], tensors.param_dtype(layer.expert(0, which)),
                          stacked(which))
    if layer.shared:
        s = info.shared_ffn
        for param, proj, shape in (("shared_gate", "gate_proj", (h, s)),
                                   ("shared_up", "up_proj", (h, s)),
                                   ("shared_down", "down_proj", (s, h))):
            name = f"{p}{layer.shared}{proj}.weight"
            out[param] = (shape, tensors.param_dtype(name),
                          lambda rows, n=name: t(tensors.weight(n))[rows])
    if info.architecture == "qwen2_moe":
        gate = f"{p}shared_expert_gate.weight"
        out["shared_expert_gate"] = ((h, 1), tensors.dtype(gate), lambda rows: t(tensors.read(gate))[rows])
    return out


def load(path: str, *, mesh=None, axis_name="ep", dispatch: DispatchConfig = DispatchConfig(),
         layers=None) -> tuple[ModelInfo, dict[int, dict]]:
    """Reads the MoE layers of the HF checkpoint directory `path`.

    Args:
      path: a directory with config.json and *.safetensors (one file or shards).
      mesh: where to put the params: expert weights [E, ...] sharded over `axis_name` (each
        process reads only its devices' experts), the rest replicated. None: default device.
      axis_name: the EP axis (or tuple of axes) of `mesh`; goes into the returned config.
      dispatch: the `DispatchConfig` of the returned config.
      layers: indices of the MoE layers to read (default: all of them).

    Returns:
      (info, params): `ModelInfo` (with `info.config` for `jep.moe`) and {layer index: params},
      params as `jep.moe` takes them: "router" f32[H, E], "w_gate"/"w_up" [E, H, F],
      "w_down" [E, F, H]; "bias" f32[E] (DeepSeek-V3); "shared_gate"/"shared_up" [H, F_s],
      "shared_down" [F_s, H] (Qwen2-MoE, DeepSeek-V3); "shared_expert_gate" [H, 1] (Qwen2-MoE).

    Raises ValueError naming the tensor for a missing, extra or misshapen MoE tensor, and for
    an unknown architecture or E not divisible by the EP size of `mesh`.
    """
    tensors = _Tensors(path)
    info = _held(read_config(path, axis_name=axis_name, dispatch=dispatch), tensors)
    wanted = info.moe_layers if layers is None else tuple(layers)
    if unknown := sorted(set(wanted) - set(info.moe_layers)):
        raise ValueError(f"layers {unknown} are not MoE layers of {path!r}; those are {info.moe_layers}")
    if mesh is not None and info.config.num_experts % info.config.ep_size(mesh):
        raise ValueError(f"num_experts={info.config.num_experts} of {path!r} is not divisible by "
                         f"the EP size {info.config.ep_size(mesh)} of the mesh (axis {axis_name!r})")
    where = {i: _layer(tensors, info, i) for i in info.moe_layers}
    _check_tensors(tensors, info, where)

    def array(param, shape, dtype, read):
        if mesh is None:
            return jnp.asarray(read(slice(None)))
        spec = P(info.config.axis_name) if param in EXPERT_PARAMS else P()

        def callback(index):
            block = read(index[0])
            return block[(slice(None),) + tuple(index[1:])]
        return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), callback)

    params = {i: {param: array(param, *reader)
                  for param, reader in _readers(tensors, where[i], info).items()}
              for i in wanted}
    return info, params


def _row(x, j: int) -> np.ndarray:
    """x[j] on the host, read from the device shard that holds row j (not the whole x)."""
    if not isinstance(x, jax.Array):
        return np.asarray(x[j])
    for shard in x.addressable_shards:
        rows = range(x.shape[0])[shard.index[0]]
        if j in rows:
            return np.asarray(shard.data[j - rows.start])
    raise ValueError(f"row {j} of an array of shape {x.shape} is on no device of this process")


def _quantized(out: dict) -> dict:
    """`out` with each FP8 weight's writer replaced by two, of its e4m3 values and of its block
    scales (`weight_scale_inv`), from one quantization of the weight (`jep.fp8.quantize_blocks`:
    fresh scales, each block's max-abs over 448)."""
    for name in [n for n in out if n.endswith(".weight")]:
        made = functools.cache(lambda f=out[name]: fp8.quantize_blocks(
            jnp.asarray(f(), jnp.float32)))
        out[name] = lambda made=made: np.asarray(made()[0])
        out[f"{name}_scale_inv"] = lambda made=made: np.asarray(made()[1])
    return out


def _writers(layer: _Layer, info: ModelInfo, params: dict) -> dict:
    """HF name -> (lambda: that tensor from jep's `params`, as a numpy array)."""
    e, p = info.config.num_experts, layer.prefix
    t = lambda a: np.swapaxes(a, -1, -2)  # noqa: E731
    host = lambda name: np.asarray(params[name])  # noqa: E731
    out = {f"{p}gate.weight": lambda: t(host("router"))}
    experts = {}
    if info.architecture == "deepseek_v3":
        out[f"{p}gate.e_score_correction_bias"] = lambda: host("bias")
    if layer.fused:
        out[f"{p}experts.gate_up_proj"] = lambda: np.concatenate(
            [t(host("w_gate")), t(host("w_up"))], axis=1)
        out[f"{p}experts.down_proj"] = lambda: t(host("w_down"))
    else:
        for which, param in enumerate(EXPERT_PARAMS):
            for j in range(e):
                experts[layer.expert(j, which)] = lambda n=param, j=j: t(_row(params[n], j))
    if layer.shared:
        for param, proj in (("shared_gate", "gate_proj"), ("shared_up", "up_proj"),
                            ("shared_down", "down_proj")):
            experts[f"{p}{layer.shared}{proj}.weight"] = lambda n=param: t(host(n))
    out |= _quantized(experts) if layer.fp8 else experts
    if info.architecture == "qwen2_moe":
        out[f"{p}shared_expert_gate.weight"] = lambda: t(host("shared_expert_gate"))
    return out


def save(path: str, params: dict[int, dict], *, source: str) -> None:
    """Writes the checkpoint directory `source` to `path` with its MoE tensors taken from
    `params` ({layer index: params}, every MoE layer of `source`, as `load` returns them), in
    `source`'s layout: the same shard files, tensor names, dtypes and metadata, every other
    tensor and file copied as it is. Params `load` returned unchanged give the same files, bit
    for bit (but FP8 weights: quantized afresh, within e4m3's rounding of what was loaded). The
    params must be addressable from this process (one process, or gathered)."""
    if os.path.abspath(path) == os.path.abspath(source):
        raise ValueError("save: path must differ from source (source is read while path is written)")
    tensors = _Tensors(source)
    info = _held(read_config(source), tensors)
    if sorted(params) != sorted(info.moe_layers):
        raise ValueError(f"params must hold every MoE layer of {source!r}, {info.moe_layers}; "
                         f"got {sorted(params)}")
    for i, layer_params in params.items():
        for name, value in layer_params.items():
            if isinstance(value, jax.Array) and not value.is_fully_addressable:
                raise ValueError(f"params[{i}][{name!r}] is not fully addressable from this "
                                 "process: gather it first (jax.experimental.multihost_utils)")
    where = {i: _layer(tensors, info, i) for i in info.moe_layers}
    _check_tensors(tensors, info, where)
    replaced = {}
    for i, layer in where.items():
        missing = sorted(set(_readers(tensors, layer, info)) - set(params[i]))
        if missing:
            raise ValueError(f"params[{i}] lacks {missing}")
        replaced |= _writers(layer, info, params[i])
    os.makedirs(path, exist_ok=True)
    for file in tensors.files:
        out = {}
        for name in tensors.names_in(file):
            if name not in replaced:
                out[name] = tensors.read(name)
                continue
            value = replaced[name]()
            if value.shape != tensors.shape(name):
                raise ValueError(f"tensor {name!r} from params has shape {value.shape}, the "
                                 f"checkpoint's is {tensors.shape(name)}")
            out[name] = np.ascontiguousarray(value.astype(tensors.dtype(name)))
        save_file(out, os.path.join(path, file), metadata=tensors.metadata(file))
    for other in os.listdir(source):
        if not other.endswith(".safetensors") and os.path.isfile(os.path.join(source, other)):
            shutil.copy2(os.path.join(source, other), os.path.join(path, other))
