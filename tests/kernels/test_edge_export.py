"""Edge export: ONNX graph with LoRA tensors as inputs, the torch-free runtime, quantization.

The torch reference for every number is the PEFT model the torch client trains
(``attach_lora`` + ``set_adapter``) scored with ``cross_entropy``, computed independently of
the exported graph.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from kernels.edge_export import export_edge
from kernels.edge_quantize import (
    DEFAULT_QUANTIZATION,
    FAST_FORWARD_QUANTIZATION,
    QUANTIZATIONS,
    QuantOption,
    quantize_blockwise,
    quantize_model,
)
from kernels.edge_runtime import EdgeModel, read_config, token_blocks
from protocols.manifest import (
    ManifestMismatch,
    ManifestSignatureError,
    generate_signing_key,
    public_key_bytes,
)
from protocols.run_config import LoraSection
from tests.measured import THREADS, within

torch.set_num_threads(THREADS)
LORA = LoraSection(r=4, seed=3)
#: ORT vs torch float32 on the tiny model: same math, different kernels and op order.
NLL_ATOL = 1e-4
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def export_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("edge") / "tiny-fp32"
    return export_edge(tiny_model_dir, out, LORA, quantization="fp32")


@pytest.fixture(scope="module")
def edge(export_dir: Path) -> EdgeModel:
    return EdgeModel(export_dir, threads=THREADS)


def _random_adapter(edge: EdgeModel, seed: int, scale: float = 0.5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32)
            for k, s in edge.adapter_shapes.items()}


def _ids(edge: EdgeModel, shape: tuple[int, int], seed: int = 0) -> npt.NDArray[np.int64]:
    return np.random.default_rng(seed).integers(0, edge.vocab_size, size=shape, dtype=np.int64)


def _torch_nll(model_dir: Path, adapter: dict[str, np.ndarray] | None,
               ids: np.ndarray) -> np.ndarray:
    from kernels.base_model import load_causal_lm
    from kernels.lora import attach_lora, set_adapter

    base = load_causal_lm(model_dir).model
    model: torch.nn.Module = base
    if adapter is not None:
        peft = attach_lora(base, LORA)
        set_adapter(peft, adapter)
        model = peft
    x = torch.from_numpy(ids)
    with torch.no_grad():
        logits = model(input_ids=x).logits[:, :-1]  # (B, S-1, V)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
    return nll.reshape(ids.shape[0], -1).numpy()


def test_adapter_inputs_are_the_wire_keys(tiny_model_dir: Path, edge: EdgeModel) -> None:
    from kernels.base_model import load_causal_lm
    from kernels.lora import attach_lora, get_adapter

    wire = get_adapter(attach_lora(load_causal_lm(tiny_model_dir).model, LORA))
    assert edge.adapter_keys == list(wire)
    assert edge.adapter_shapes == {k: v.shape for k, v in wire.items()}
    graph_inputs = {i.name for i in edge.session.get_inputs()}
    assert graph_inputs == {"input_ids", *(e["input"] for e in edge.config["adapter"])}


@pytest.mark.measured
def test_token_nll_matches_torch_with_random_adapter(tiny_model_dir: Path,
                                                     edge: EdgeModel) -> None:
    adapter = _random_adapter(edge, seed=1)
    for shape in [(3, 12), (1, 2), (2, 33)]:  # batch and sequence are dynamic
        ids = _ids(edge, shape)
        got = edge.token_nll(ids, adapter)
        assert got.shape == (shape[0], shape[1] - 1) and got.dtype == np.float32
        within(f"max |ORT - torch NLL| {shape}",
               np.abs(got - _torch_nll(tiny_model_dir, adapter, ids)).max(), below=NLL_ATOL)
    ids = _ids(edge, (3, 12))
    assert edge.mean_loss(ids, adapter) == pytest.approx(float(edge.token_nll(ids, adapter).mean()))


def test_zero_adapter_is_the_base_model_and_adapter_changes_output(
        tiny_model_dir: Path, edge: EdgeModel) -> None:
    ids = _ids(edge, (2, 16))
    zero = edge.token_nll(ids, edge.zero_adapter())
    np.testing.assert_allclose(zero, _torch_nll(tiny_model_dir, None, ids), atol=NLL_ATOL)
    moved = edge.token_nll(ids, _random_adapter(edge, seed=2))
    assert np.abs(moved - zero).max() > 1e-2


def test_one_session_serves_many_adapters_without_stale_buffers(edge: EdgeModel) -> None:
    session = edge.session
    ids = _ids(edge, (2, 10))
    a, b = _random_adapter(edge, seed=4), _random_adapter(edge, seed=5)
    first_a, out_b, again_a = (edge.token_nll(ids, a), edge.token_nll(ids, b),
                               edge.token_nll(ids, a))
    assert edge.session is session
    np.testing.assert_array_equal(first_a, again_a)
    assert np.abs(first_a - out_b).max() > 1e-3
    # The caller's arrays are copied per call: mutating them afterwards changes nothing
    # already returned, and the next call sees the new values.
    key = edge.adapter_keys[1]
    a[key] += 1.0
    np.testing.assert_array_equal(first_a, again_a)
    assert np.abs(edge.token_nll(ids, a) - first_a).max() > 1e-3


def test_bad_inputs_are_refused_with_the_reason(edge: EdgeModel) -> None:
    adapter = edge.zero_adapter()
    key = edge.adapter_keys[0]
    with pytest.raises(ValueError, match="missing"):
        edge.token_nll(_ids(edge, (1, 4)), {k: v for k, v in adapter.items() if k != key})
    with pytest.raises(ValueError, match=f"`{key}`: expected shape"):
        edge.token_nll(_ids(edge, (1, 4)), {**adapter, key: np.zeros((1, 1), np.float32)})
    with pytest.raises(ValueError, match="token ids must be in"):
        edge.token_nll(np.array([[0, edge.vocab_size]]), adapter)
    with pytest.raises(ValueError, match="seq >= 2"):
        edge.token_nll(np.array([[1]]), adapter)


def test_tampered_model_is_refused(export_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(export_dir, tmp_path / "copy"))
    with open(copy / "model.onnx", "r+b") as fh:  # flip one byte in the weights' tail
        fh.seek(-100, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-100, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ManifestMismatch, match=r"changed files \['model.onnx'\]") as err:
        EdgeModel(copy)
    assert err.value.changed == ("model.onnx",)
    shutil.copy(export_dir / "model.onnx", copy / "model.onnx")
    (copy / "extra.onnx").write_bytes(b"x")  # a stray file a loader might pick up
    with pytest.raises(ManifestMismatch, match="unexpected files"):
        EdgeModel(copy)


def test_signed_export_verifies_with_the_pinned_key(tiny_model_dir: Path, export_dir: Path,
                                                    tmp_path: Path) -> None:
    key = generate_signing_key()
    copy = Path(shutil.copytree(export_dir, tmp_path / "signed"))
    export_edge(tiny_model_dir, copy, LORA, quantization="fp32", signing_key=key)  # cached
    assert (copy / "fedtune-manifest.sig").is_file()
    EdgeModel(copy, public_key=public_key_bytes(key.public_key()))
    with pytest.raises(ManifestSignatureError):
        EdgeModel(copy, public_key=generate_signing_key().public_key())


def test_export_is_cached_and_options_are_checked(tiny_model_dir: Path,
                                                  export_dir: Path) -> None:
    before = (export_dir / "model.onnx").stat().st_mtime_ns
    export_edge(tiny_model_dir, export_dir, LORA, quantization="fp32")
    assert (export_dir / "model.onnx").stat().st_mtime_ns == before
    config = read_config(export_dir)
    assert config["quantization"] == "fp32" and config["lora"]["r"] == LORA.r
    with pytest.raises(ValueError, match=r"unknown quantization 'int3'; valid: .*int8-smooth"):
        export_edge(tiny_model_dir, export_dir, LORA, quantization="int3")
    assert not [p for p in export_dir.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("name", ["int8", "int8-smooth", "int4", "int4-gguf", "int8-nbits"])
@pytest.mark.measured
def test_quantized_graphs_run_and_stay_close(export_dir: Path, edge: EdgeModel,
                                             tmp_path: Path, name: str) -> None:
    import onnx
    import onnxruntime as ort

    from kernels.edge_export import calibration_blocks

    calibration = calibration_blocks(edge.tokenizer, eos_token_id=edge.eos_token_id,
                                     seq_len=16)
    out = tmp_path / f"{name}.onnx"
    quantize_model(export_dir / "model.onnx", out, name, calibration=calibration)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ops & {"DynamicQuantizeMatMul", "MatMulNBits"}
    adapter = _random_adapter(edge, seed=6, scale=0.2)
    ids = _ids(edge, (2, 16))
    names = {e["key"]: e["input"] for e in edge.config["adapter"]}
    got = session.run(None, {"input_ids": ids, **{names[k]: v for k, v in adapter.items()}})[0]
    ref = edge.token_nll(ids, adapter)
    # Tiny random model: NLL ~ log(vocab) ~ 5.8; 4-bit weights move it by a few 1e-2.
    within(f"{name}: mean |quantized - fp32 NLL|", np.abs(got - ref).mean(), below=0.05)
    within(f"{name}: max |quantized - fp32 NLL|", np.abs(got - ref).max(), below=0.3)


def test_default_quantized_export_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = export_edge(tiny_model_dir, tmp_path / "default", LORA)
    model = EdgeModel(out)
    assert model.quantization == "int4-gguf" and model.float_activations
    ids = _ids(model, (2, 12))
    assert np.isfinite(model.token_nll(ids, _random_adapter(model, seed=7))).all()
    fast = EdgeModel(export_edge(tiny_model_dir, tmp_path / "fast", LORA,
                                 quantization=FAST_FORWARD_QUANTIZATION))
    assert not fast.float_activations
    assert np.isfinite(fast.token_nll(ids, _random_adapter(model, seed=7))).all()


def test_only_float_activation_options_are_marked_mezo_safe() -> None:
    # MeZO's finite differences need float activations; the measurement on SmolLM2 is in
    # simulations.bench.edge_forward (the tiny random model is too small to show the noise).
    safe = {name for name, option in QUANTIZATIONS.items() if option.float_activations}
    assert safe == {"fp32", "int4", "int4-b128", "int4-gguf", "int8-nbits"}
    assert QUANTIZATIONS[DEFAULT_QUANTIZATION].float_activations
    assert not QuantOption("x", "", "nbits", accuracy_level=4).float_activations


def test_blockwise_packing_matches_ort_quantizer() -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    rng = np.random.default_rng(0)
    for bits, k in [(4, 96), (8, 96), (4, 80), (4, 576)]:  # 80, 576: K padded to the block
        weight = rng.standard_normal((k, 40)).astype(np.float32)
        block = 128 if k == 576 else 32
        config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, bits=bits)
        packed, scales, zero = DefaultWeightOnlyQuantizer(config).qbits_block_quant(weight)
        ours = quantize_blockwise(weight, bits=bits, block_size=block, float_zero_point=False)
        np.testing.assert_array_equal(ours[0], packed)
        np.testing.assert_array_equal(ours[1], scales.reshape(-1))
        np.testing.assert_array_equal(ours[2], zero.reshape(-1))


def test_float_zero_points_are_exact_on_a_q4_1_grid(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n = 64, 24
    # Q4_1: per block of 32 along K, w = min + d * q with q in 0..15 (as GGUF stores it)
    lo = rng.standard_normal((n, k // 32, 1)).astype(np.float32)
    d = rng.uniform(0.01, 0.1, (n, k // 32, 1)).astype(np.float32)
    q = rng.integers(0, 16, (n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15
    weight = (lo + d * q).astype(np.float32).reshape(n, k).T.copy()  # (K, N)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(weight, "w")])
    src, dst = tmp_path / "mm.onnx", tmp_path / "mm4.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), str(src))
    exact = QuantOption("t", "test", "nbits", bits=4, block_size=32, float_zero_point=True)
    quantize_model(src, dst, exact)
    x = rng.standard_normal((5, k)).astype(np.float32)
    y = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ weight, atol=1e-4)


def test_options_are_validated() -> None:
    assert {"fp32", "int8", "int8-smooth", "int4", "int4-gguf"} <= set(QUANTIZATIONS)
    with pytest.raises(ValueError, match="float_zero_point needs bits=4"):
        QuantOption("x", "", "nbits", bits=8, float_zero_point=True)
    with pytest.raises(ValueError, match="block_size 48"):
        QuantOption("x", "", "nbits", block_size=48)
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(Path("unused.onnx"), Path("out.onnx"), "int8-smooth")


def test_token_blocks_match_the_torch_client(tiny_model_dir: Path, edge: EdgeModel) -> None:
    from transformers import AutoTokenizer

    from kernels.causal_lm_data import token_blocks as torch_blocks

    texts = ["Speech one: the isle is full of noises,", "sounds and sweet airs.", "Ho!"] * 9
    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    np.testing.assert_array_equal(edge.token_blocks(texts, 8), torch_blocks(hf, texts, 8))


def test_token_blocks_match_on_smollm2_tokenizer() -> None:
    model_dir = REPO / ".fedtune-cache" / "models" / "smollm2-135m-instruct"
    if not (model_dir / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 not prepared (`fedtune prepare`)")
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from kernels.causal_lm_data import token_blocks as torch_blocks

    hf = AutoTokenizer.from_pretrained(model_dir)
    fast = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    texts = ["O, what a rogue and peasant slave am I!", "  Is it not monstrous\nthat this"] * 5
    np.testing.assert_array_equal(
        token_blocks(fast, texts, 16, eos_token_id=hf.eos_token_id), torch_blocks(hf, texts, 16))


_CHILD = """
import importlib.abc, json, sys
from pathlib import Path
BLOCKED = {"torch", "transformers", "peft", "onnx", "onnxscript"}  # not in fedtune[edge]
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on an edge device")
        return None
sys.meta_path.insert(0, Block())
import numpy as np
from kernels.edge_runtime import EdgeModel
model = EdgeModel(Path(sys.argv[1]), threads=1)
ids = np.array(json.loads(sys.argv[2]), dtype=np.int64)
rng = np.random.default_rng(8)
adapter = {k: (0.5 * rng.standard_normal(s)).astype(np.float32)
           for k, s in model.adapter_shapes.items()}
print(json.dumps({"nll": model.token_nll(ids, adapter).tolist(),
                  "loaded": sorted(m for m in BLOCKED if m in sys.modules)}))
"""


def test_edge_runtime_works_without_torch(export_dir: Path, edge: EdgeModel) -> None:
    ids = _ids(edge, (2, 9))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(export_dir), json.dumps(ids.tolist())],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    np.testing.assert_allclose(np.array(result["nll"], dtype=np.float32),
                               edge.token_nll(ids, _random_adapter(edge, seed=8)), atol=1e-6)


def test_chat_data_is_scored_on_the_answers_alike_on_torch_and_edge(
        tiny_model_dir: Path, export_dir: Path, edge: EdgeModel) -> None:
    """The response-only loss: the same blocks and mask on both kinds of device, the loss
    the masked mean of the per-token loss, and a different number from the all-token loss."""
    from client.edge_trainer import EdgeMeZOTrainer
    from client.local_data import LocalData
    from client.torch_trainer import TorchLoraTrainer
    from kernels.data.examples import chat

    data = LocalData("chat", train=(), heldout=tuple(
        chat(("user", f"what did PROSPERO say {i}?"), ("assistant", "the isle is full of "
                                                                    f"noises {i}"))
        for i in range(6)))
    torch_trainer = TorchLoraTrainer(tiny_model_dir, LORA, threads=THREADS)
    edge_trainer = EdgeMeZOTrainer(edge, LORA)
    blocks = torch_trainer.blocks.get(data, "heldout", 192)
    edge_blocks = edge_trainer.blocks.get(data, "heldout", 192)
    np.testing.assert_array_equal(blocks.ids, edge_blocks.ids)
    np.testing.assert_array_equal(blocks.scored, edge_blocks.scored)
    assert 0 < blocks.scored_tokens < blocks.ids[:, 1:].size  # prompts are not scored
    adapter = _random_adapter(edge, seed=7)
    on_torch = torch_trainer.evaluate(adapter, data, seq_len=192, batch_size=4)
    on_edge = edge_trainer.evaluate(adapter, data, seq_len=192, batch_size=4)
    nll = _torch_nll(tiny_model_dir, adapter, blocks.ids)  # (B, S-1)
    answers_only = float(nll[blocks.scored[:, 1:]].mean())
    assert on_torch.tokens == on_edge.tokens == blocks.scored_tokens
    assert on_torch.loss == pytest.approx(answers_only, rel=1e-5)
    assert on_edge.loss == pytest.approx(answers_only, rel=1e-4)
    assert abs(answers_only - float(nll.mean())) > 1e-3
    assert edge.mean_loss(blocks.ids[:2], adapter, scored=blocks.scored[:2]) == pytest.approx(
        float(nll[:2][blocks.scored[:2, 1:]].mean()), rel=1e-4)


@pytest.mark.parametrize("kind", ["ia3", "prompt"])
@pytest.mark.measured
def test_ia3_and_prompt_exports_take_their_tensors_as_inputs_and_match_peft(
        tiny_model_dir: Path, tmp_path: Path, kind: str) -> None:
    """(IA)3 scales and prompt embeddings are graph inputs named by their wire keys; the
    ORT loss over the real tokens equals PEFT's model holding the same tensors, for any
    values (one session serves every adapter version), at any batch and length."""
    from kernels.base_model import load_causal_lm
    from kernels.lora import attach_adapter, get_adapter, set_adapter

    lora = LoraSection(kind=kind, virtual_tokens=3, seed=3)
    edge = EdgeModel(export_edge(tiny_model_dir, tmp_path / kind, lora, quantization="fp32"),
                     threads=THREADS)
    peft = attach_adapter(load_causal_lm(tiny_model_dir).model, lora)
    start = get_adapter(peft)
    assert edge.adapter_shapes == {k: v.shape for k, v in start.items()}
    assert edge.config["lora"]["kind"] == kind
    rng = np.random.default_rng(0)
    for values in (start, {k: (v + 0.4 * rng.standard_normal(v.shape)).astype(np.float32)
                           for k, v in start.items()}):
        set_adapter(peft, values)
        for shape in [(2, 9), (1, 2)]:
            ids = _ids(edge, shape)
            x = torch.from_numpy(ids)
            with torch.no_grad():
                logits = peft(input_ids=x).logits[:, -shape[1]:-1]  # the real tokens' logits
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                    reduction="none").reshape(shape[0], -1).numpy()
            within(f"{kind}: max |ORT - PEFT NLL| {shape}",
                   np.abs(edge.token_nll(ids, values) - nll).max(), below=NLL_ATOL)


def test_a_prefix_adapter_has_no_edge_export(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"lora\.kind = 'prefix' has no edge export"):
        export_edge(tiny_model_dir, tmp_path / "x", LoraSection(kind="prefix"),
                    quantization="fp32")
