"""FlexAttention on users' GPUs, checked on a CPU: inductor's own config heuristics and FlexAttention lowering for
mocked compute capabilities, Triton's shared-memory allocation of the kernels it generates, the SDPA fallback."""
import contextlib
import importlib
import types

import pytest
import torch

from lmafs.network import attention
from model import GPT

# The GPUs users train on: compute capability and maximum shared memory of one thread block (opt-in), from the
# CUDA C++ Programming Guide's table per compute capability.
GPUS = {"A100": ((8, 0), 163 * 1024), "RTX 30xx": ((8, 6), 99 * 1024), "RTX 40xx": ((8, 9), 99 * 1024),
        "H100": ((9, 0), 227 * 1024)}
DTYPES = (torch.float32, torch.bfloat16)
HEAD_DIMS = (32, 64, 96, 128)


def gpuProperties(capability, sharedMemory):
    return types.SimpleNamespace(name="mocked", major=capability[0], minor=capability[1], multi_processor_count=128,
                                 shared_memory_per_block_optin=sharedMemory, shared_memory_per_block=48 * 1024,
                                 regs_per_multiprocessor=65536, max_threads_per_multi_processor=1536,
                                 max_threads_per_block=1024, warp_size=32, total_memory=16 << 30, gcnArchName="")


def modelOnMockedGpu(monkeypatch, capability, sharedMemory, headDim, flexBlockSize=32):
    """A FlexAttention GPT built as trainLmAf builds it on a CUDA GPU of this capability."""
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        m.setattr(torch.cuda, "get_device_properties", lambda device=None: gpuProperties(capability, sharedMemory))
        return GPT(vocabSize=64, nLayers=1, nHeads=2, dimEmb=2 * headDim, contextSize=16, tokenDocSep=0,
                   attention="flex", flexBlockSize=flexBlockSize, device="cuda")


def whatFlexReceives(model, dtype, headDim, T=256):
    """(block mask, kernel options) that the model's attention kernel hands to FlexAttention for this dtype."""
    docs = torch.zeros(1, T, dtype=torch.int32)
    mask = model.kernel.mask(docs)
    received = {}
    model.kernel.flexAttention = lambda q, k, v, block_mask, kernel_options=None: received.update(kernel_options or {})
    q = torch.zeros(1, 2, T, headDim, dtype=dtype)
    model.kernel(q, q, q, mask)
    return mask, received


def inductorConfigs(monkeypatch, capability, dtype, headDim):
    from torch._inductor.virtualized import V
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        return (V.choices.get_flex_attention_fwd_configs(headDim, dtype, "cuda"),
                V.choices.get_flex_attention_bwd_configs(headDim, dtype, "cuda"))


def loweredConfigs(configs, options, maskBlock, kind):
    """The (tiles, num_stages) the FlexAttention lowering of torch 2.13 compiles, kernel options applied:
    options beat config fields, fwd_/bwd_ options only reach their own kernel, and a config is skipped when
    the mask block is not a multiple of its tiles (the backward also checks the config's own tiles)."""
    prefix = "fwd_" if kind == "forward" else "bwd_"
    effective = {k: v for k, v in options.items() if not k.startswith(("fwd_", "bwd_"))}
    effective.update({k[4:]: v for k, v in options.items() if k.startswith(prefix)})
    result = []
    for conf in configs:
        if kind == "forward":
            names, own = ("BLOCK_M", "BLOCK_N"), ()
            defaults = (conf.block_m, conf.block_n)
        else:
            names = ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")
            own = defaults = (conf.block_m1, conf.block_n1, conf.block_m2, conf.block_n2)
        tiles = tuple(effective.get(n, d) for n, d in zip(names, defaults))
        if any(maskBlock % t for t in tiles + own):
            continue
        if kind == "backward":  # the backward kernel's static asserts
            assert tiles[1] % tiles[0] == 0 and tiles[2] % tiles[3] == 0, tiles
        result.append((tiles, effective.get("num_stages", conf.num_stages)))
    return result


# ----------------------------------------------------------------------------------------------
# Inductor's heuristics, asked about each GPU


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("headDim", HEAD_DIMS)
def testInductorHasUsableFlexConfigsOnUsersGpus(monkeypatch, gpu, dtype, headDim):
    capability, sharedMemory = GPUS[gpu]
    model = modelOnMockedGpu(monkeypatch, capability, sharedMemory, headDim)
    mask, options = whatFlexReceives(model, dtype, headDim)
    qBlock, kvBlock = mask.BLOCK_SIZE
    assert qBlock == kvBlock
    fwdConfigs, bwdConfigs = inductorConfigs(monkeypatch, capability, dtype, headDim)
    forward = loweredConfigs(fwdConfigs, options, qBlock, "forward")
    backward = loweredConfigs(bwdConfigs, options, qBlock, "backward")
    assert forward, f"no forward config inductor would compile: mask block {qBlock}, options {options}, " \
                    f"heuristic configs {fwdConfigs}"
    assert backward, f"no backward config inductor would compile: mask block {qBlock}, options {options}, " \
                     f"heuristic configs {bwdConfigs}"
    for kind, configs in (("forward", forward), ("backward", backward)):
        for tiles, stages in configs:
            assert all(qBlock % t == 0 for t in tiles) and stages >= 1
            assert set(tiles) == {32}, "flexBlockSize is the kernels' tile"
            # inductor has no shared-memory estimate for FlexAttention; ours is checked against Triton below
            assert attention.flexSharedMemory(kind, 32, headDim, dtype, stages, capability) <= sharedMemory


def testDescriptionForGpusNotPresent():
    for gpu, (capability, sharedMemory) in GPUS.items():
        for dtype in DTYPES:
            plan = attention.describeFlexAttention(capability, dtype, 64, 32)
            assert plan.compiles and plan.maskBlockSize == 128 and plan.sharedMemoryPerBlock == sharedMemory
            assert plan.kernelOptions == attention.flexTileOptions(32)  # inductor's pipelines fit at tile 32
            assert len(plan.lines()) == 2 + len(plan.forward) + len(plan.backward)
    # Tile 64, head size 128, float32: Triton allocates 144 KB to the one-stage backward (more than an RTX 4090
    # has), ~113 KB to a two-stage forward and ~177 KB to the three stages inductor would use (more than an A100).
    consumer = attention.describeFlexAttention((8, 9), torch.float32, 128, 64)
    assert consumer.compiles is False and "WILL NOT COMPILE" in consumer.lines()[0]
    a100 = attention.describeFlexAttention((8, 0), torch.float32, 128, 64)
    assert a100.compiles and a100.kernelOptions["fwd_num_stages"] == 2 and a100.forward[0].numStages == 2
    assert "bwd_num_stages" not in a100.kernelOptions and a100.backward[0].numStages == 1
    with pytest.raises(ValueError, match="flexBlockSize"):
        attention.describeFlexAttention((9, 0), torch.float32, 64, 48)


# ----------------------------------------------------------------------------------------------
# Inductor's FlexAttention lowering and Triton's compiler for a GPU that is not present.
# Inductor lowers for CUDA on fake tensors once torch.cuda, its device interface and Triton's driver answer for
# a mocked GPU; its generated kernels are then compiled by Triton for that GPU's architecture up to LLVM IR,
# where Triton has allocated shared memory (no ptxas, no GPU). Autograd cannot record fake CUDA tensors in a
# CPU build, so the backward is lowered from its own operator.


class _TritonAllocated(Exception):
    pass


class _MockedTritonDriver:
    def __init__(self, capability):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import ty_to_cpp
        self.target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
        self.map_python_to_cpp_type = ty_to_cpp

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cuda", 0)

    def get_device_interface(self):
        return torch.cuda


@contextlib.contextmanager
def mockedGpu(monkeypatch, capability, sharedMemory):
    from torch._dynamo.device_interface import CudaInterface
    from torch._inductor.async_compile import AsyncCompile
    from torch._inductor.runtime.hints import DeviceProperties
    from triton.runtime.driver import driver
    hop = importlib.import_module("torch._higher_order_ops.flex_attention")  # the package attribute is the operator
    deviceInterface = importlib.import_module("torch._dynamo.device_interface")
    from torch.utils._triton import has_triton as hasTriton
    jointGraph = importlib.import_module("torch._inductor.fx_passes.joint_graph")
    props = gpuProperties(capability, sharedMemory)
    createFwBwGraph = hop.create_fw_bw_graph

    def fwBwGraphOnCpu(scoreMod, exampleValues, buffers):  # a graph of scalars: traced on CPU, valid anywhere
        cpuValues = tuple(torch.zeros((), dtype=x.dtype, requires_grad=x.requires_grad) for x in exampleValues)
        return createFwBwGraph(scoreMod, cpuValues, buffers)

    def permutedOutput(out, queryStrides):  # as upstream, without copying into a CUDA tensor (no CUDA kernels)
        from torch._inductor.ir import get_fill_order
        last = out.dim() - 1
        order = [last] + [d for d in get_fill_order(queryStrides) if d != last]
        return torch.empty_strided(out.shape, hop._construct_strides(out.shape, order), dtype=out.dtype,
                                   device=out.device)

    kernels = {}
    with monkeypatch.context() as m:
        # dynamo caches the GPU's properties, and torch whether Triton has a GPU, once per process (FlexAttention's
        # eager CPU path asks): an earlier test's mocked or absent GPU must not answer for this one
        for cache in ("caching_worker_device_properties", "caching_worker_current_devices"):
            m.setattr(deviceInterface, cache, {})
        hasTriton.cache_clear()
        for name, value in dict(is_available=lambda: True, get_device_capability=lambda device=None: capability,
                                get_device_properties=lambda device=None: props, device_count=lambda: 1,
                                current_device=lambda: 0, _lazy_init=lambda: None,
                                get_rng_state=lambda device="cuda": torch.zeros(16, dtype=torch.uint8),
                                set_rng_state=lambda *args, **kwargs: None, _exchange_device=lambda device: -1,
                                _maybe_exchange_device=lambda device: -1).items():
            m.setattr(torch.cuda, name, value)
        for name, value in dict(get_device_properties=lambda device=None: props, current_device=lambda: 0,
                                device_count=lambda: 1, exchange_device=lambda device: -1,
                                maybe_exchange_device=lambda device: -1, get_raw_stream=lambda device: 0).items():
            m.setattr(CudaInterface, name, staticmethod(value))
        m.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 0, raising=False)
        m.setattr(jointGraph, "lazy_init", lambda *args, **kwargs: None)  # its patterns are built on real CUDA
        m.setattr(hop, "create_fw_bw_graph", fwBwGraphOnCpu)
        m.setattr(hop, "_permute_strides", permutedOutput)
        m.setattr(AsyncCompile, "triton", lambda self, name, source, device_str="cuda": kernels.setdefault(name,
                                                                                                          source))
        m.setattr(driver, "_active", _MockedTritonDriver(capability))
        DeviceProperties.create.cache_clear()
        try:
            with torch._inductor.config.patch(compile_threads=1, pattern_matcher=False, fx_graph_cache=False):
                yield kernels
        finally:
            DeviceProperties.create.cache_clear()
            hasTriton.cache_clear()  # the real answer again, for the tests that follow
            torch._dynamo.reset()


def lowerFlexKernels(monkeypatch, capability, sharedMemory, dtype, headDim, blockMask, options, T):
    """Inductor's Triton sources of the FlexAttention forward and backward for this GPU, keyed by kernel name."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.nn.attention.flex_attention import BlockMask, _apply_kernel_options, flex_attention
    from torch._higher_order_ops.flex_attention import flex_attention_backward
    with mockedGpu(monkeypatch, capability, sharedMemory) as kernels:
        with FakeTensorMode(allow_non_fake_inputs=True):
            q, k, v, out, gradOut = (torch.empty(1, 2, T, headDim, dtype=dtype, device="cuda") for _ in range(5))
            lse, gradLse = (torch.empty(1, 2, T, device="cuda") for _ in range(2))
            docs = torch.empty(1, T, dtype=torch.int32, device="cuda")
            tensors = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda") if t is not None
                       else None for t in (getattr(blockMask, a) for a in blockMask._TENSOR_ATTRS)]

        def maskMod(b, h, qi, ki):  # the LM-AFs mask, reading document ids on the (fake) GPU
            return (ki <= qi) & (qi - ki < 16) & (docs[b, qi] == docs[b, ki])

        mask = BlockMask(seq_lengths=blockMask.seq_lengths, **dict(zip(blockMask._TENSOR_ATTRS, tensors)),
                         BLOCK_SIZE=blockMask.BLOCK_SIZE, mask_mod=maskMod, dq_kv_order_spt=blockMask.dq_kv_order_spt)
        backwardOptions = _apply_kernel_options(q, k, v, True, options)

        def forward(q, k, v, mask):
            return flex_attention(q, k, v, block_mask=mask, kernel_options=options)

        def backward(q, k, v, out, lse, gradOut, gradLse, mask):
            return flex_attention_backward(q, k, v, out, lse, gradOut, gradLse, lambda score, b, h, m, n: score,
                                           None, mask.as_tuple(), headDim ** -0.5, backwardOptions, (), ())

        for fn, args in ((forward, (q, k, v, mask)), (backward, (q, k, v, out, lse, gradOut, gradLse, mask))):
            torch._dynamo.reset()
            with pytest.raises(AttributeError, match="_cuda_setDevice"):  # lowered; only running needs a GPU
                torch.compile(fn, fullgraph=True, dynamic=False)(*args)
    return {name: source for name, source in kernels.items() if name.startswith("triton_tem_fused_flex")}


def tritonSharedMemory(monkeypatch, capability, sharedMemory, name, source):
    """(bytes of shared memory, num_stages, num_warps) of an inductor template kernel compiled by Triton for
    this GPU; Triton allocates shared memory before leaving its GPU IR, so compilation stops at LLVM IR."""
    import triton
    from torch._inductor.async_compile import _load_triton_kernel_from_source
    from triton import knobs
    from triton.compiler import ASTSource

    def stopAtLlvmIr(backend=None, stages=None, options=None, language=None, capability=None):
        if backend is None:  # asked for a cache key
            return "lmafsStopAtLlvmIr", "1"

        def stop(source, metadata):
            raise _TritonAllocated(metadata["shared"])
        stages["ptx"] = stop

    with mockedGpu(monkeypatch, capability, sharedMemory), monkeypatch.context() as m:
        kernel = _load_triton_kernel_from_source(name, source)
        config = kernel.configs[0]
        meta = kernel._create_compile_meta(config)
        m.setattr(knobs.runtime, "add_stages_inspection_hook", stopAtLlvmIr)
        with pytest.raises(_TritonAllocated) as allocated:
            triton.compile(ASTSource(kernel.fn, meta["signature"], meta["constants"], meta["configs"][0]),
                           target=_MockedTritonDriver(capability).target,
                           options=kernel._create_compile_options(config, meta))
    return allocated.value.args[0], config.num_stages, config.num_warps


# A CUDA build of torch on a machine without a GPU asks the missing driver where the mocked GPU answers in a CPU build
needsCpuBuild = pytest.mark.skipif(torch.version.cuda is not None and torch.cuda.device_count() == 0,
                                   reason="the mocked GPU needs torch's CPU build (this CUDA build asks for a driver)")


@needsCpuBuild
@pytest.mark.parametrize("gpu, dtype, headDim", [("RTX 40xx", torch.float32, 128), ("H100", torch.bfloat16, 128)])
def testInductorLowersFlexAndTritonFitsItInSharedMemory(monkeypatch, gpu, dtype, headDim):
    # The largest kernels at the default tile on a 99 KB consumer GPU (float32, head size 128), and an H100 in
    # bfloat16, whose heuristics run the backward with 3 stages and 8 warps.
    pytest.importorskip("triton")
    capability, sharedMemory = GPUS[gpu]
    T = 512
    model = modelOnMockedGpu(monkeypatch, capability, sharedMemory, headDim)
    mask, options = whatFlexReceives(model, dtype, headDim, T)
    kernels = lowerFlexKernels(monkeypatch, capability, sharedMemory, dtype, headDim, mask, options, T)
    assert len(kernels) == 2 and sum("backward" in name for name in kernels) == 1
    for name, source in kernels.items():
        kind = "backward" if "backward" in name else "forward"
        shared, stages, warps = tritonSharedMemory(monkeypatch, capability, sharedMemory, name, source)
        estimate = attention.flexSharedMemory(kind, 32, headDim, dtype, stages, capability)
        assert shared <= sharedMemory, f"{kind}: Triton allocates {shared} B, the GPU has {sharedMemory} B"
        assert shared <= estimate <= shared + 12 * 1024, f"{kind}: estimate {estimate} B, Triton {shared} B"


# ----------------------------------------------------------------------------------------------
# Falling back to SDPA when FlexAttention fails on the GPU


def tinyGpt(attention):
    torch.manual_seed(0)
    return GPT(vocabSize=32, nLayers=2, nHeads=2, dimEmb=16, contextSize=5, tokenDocSep=0, attention=attention,
               flexBlockSize=16)


def testFallBackToSdpaAfterAFailedCompiledStep():
    flex, sdpa = tinyGpt("flex"), tinyGpt("sdpa")
    tokens = torch.randint(0, 6, (1, 2, 41))

    def failingFlex(*args, **kwargs):  # what a GPU without a fitting kernel raises, wrapped as inductor does
        try:
            raise ValueError("Q and KV block size must be divisible by BLOCK_M and BLOCK_N.")
        except ValueError as cause:
            raise RuntimeError("backend='inductor' raised:\nLoweringException: ...") from cause

    flex.kernel.flexAttention = failingFlex
    compiled = torch.compile(flex, backend="eager")  # the trainer compiles the model on CUDA
    with pytest.raises(RuntimeError) as failure:
        compiled(tokens[..., :-1], tokens[..., 1:])
    line = flex.kernel.fallBackToSdpa(failure.value)
    assert "\n" not in line and "SDPA" in line and "Q and KV block size must be divisible" in line
    assert flex.kernel.implementation == "sdpa" and flex.kernel.flexFailure.startswith("ValueError: Q and KV")
    losses, _ = compiled(tokens[..., :-1], tokens[..., 1:])  # the same compiled model, retraced
    expected, _ = sdpa(tokens[..., :-1], tokens[..., 1:])
    torch.testing.assert_close(losses, expected)
    losses.sum().backward()
    assert all(p.grad is not None for p in flex.blocks[0].attn.parameters())
    # Once on SDPA, a failure is not FlexAttention's: it propagates.
    with pytest.raises(KeyError, match="unrelated"):
        flex.kernel.fallBackToSdpa(KeyError("unrelated"))


def testFlexBlockSizeIsValidated():
    with pytest.raises(ValueError, match="flexBlockSize must be one of"):
        attention.AttentionKernel("sdpa", 16, 48, 8)


def testFlexAttentionCompiledAloneTakesEveryBatchSizeInTwoGraphs():
    # --compileBackend none on CUDA compiles FlexAttention on its own; passes of 1..N models, validation and the
    # AF-input statistics differ in batch size, and with static shapes each compiled a graph until dynamo's recompile
    # limit (8), past which FlexAttention ran eagerly with dense scores
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    flex = attention.compiledFlexAttention(backend="aot_eager")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch in range(1, 13):
            q, k, v = (torch.randn(batch, 2, 64, 8, generator=generator) for _ in range(3))
            docs = attention.documentIds(torch.randint(0, 6, (batch, 64), generator=generator), 0)
            out = flex(q, k, v, block_mask=attention.flexBlockMask(docs, 16))
            reference = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=attention.denseAttentionMask(docs, 16))
            torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] <= 2
    torch._dynamo.reset()
