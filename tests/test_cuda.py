"""CUDA path: bf16 weights, SDPA attention, compiled decode with CUDA graphs. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from internvl_mpo.generate.engine import Engine, Request
from internvl_mpo.generate.params import SamplingParams
from internvl_mpo.model import InternVL
from internvl_mpo.pipeline import InternVLChat

from conftest import tiny_chat_folder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_chat_folder(tmp_path_factory.mktemp("cuda") / "model")[0]


def test_bf16_on_cuda_matches_fp32_on_cpu(folder):
    cpu = InternVL.from_pretrained(folder)
    gpu = InternVL.from_pretrained(folder, device="cuda")
    assert gpu.dtype == torch.bfloat16 and gpu.device.type == "cuda"
    ids = torch.tensor([[5, 6, 7] + [cpu.image_token_id] * 4 + [8, 9]])
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = cpu(ids, pixel_values=pixels)
        got = gpu(ids.cuda(), pixel_values=pixels.cuda())
    assert_close(got.float().cpu(), expected, atol=0.05, rtol=0.05)


def test_compiled_cuda_graph_decode_equals_eager(folder):
    chat = InternVLChat.from_pretrained(folder, device="cuda", dtype="float32")
    ids = chat.prepare("Describe the picture.").prompt_ids
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)

    def run(engine):
        out = {0: [], 1: []}
        for events in engine.generate([Request(ids, params), Request(ids[:-3], params)]):
            for e in events:
                out[e.rid].append(e.token)
        return out

    eager = run(chat.engine)
    compiled = run(Engine(chat.model, chat.engine.stop_token_ids, compile=True))
    assert compiled == eager


def test_chat_on_cuda_bf16(folder):
    chat = InternVLChat.from_pretrained(folder, device="cuda")
    from PIL import Image

    answer = chat.chat("What is it?", images=Image.new("RGB", (80, 40), "red"), max_new_tokens=8, do_sample=False)
    assert isinstance(answer, str)
    assert chat.batch_chat(["a", "b"], max_new_tokens=4, do_sample=False)


def test_device_map_hops_between_devices(folder):
    """Half the decoder on the CPU, the rest on the GPU: outputs equal the one-device model."""
    cpu = InternVL.from_pretrained(folder)
    device_map = {"vision_model": "cuda:0", "mlp1": "cuda:0", "language_model": "cuda:0",
                  "language_model.model.layers.0": "cpu"}
    split = InternVL.from_pretrained(folder, dtype="float32", device_map=device_map)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert_close(split(ids.cuda()).cpu(), cpu(ids), atol=1e-4, rtol=1e-4)
    chat = InternVLChat(split, InternVLChat.from_pretrained(folder).tokenizer)
    assert chat.chat("hi", max_new_tokens=5, do_sample=False) == InternVLChat(
        cpu, chat.tokenizer).chat("hi", max_new_tokens=5, do_sample=False)


def test_seeded_sampling_on_cuda_repeats_with_every_filter(folder):
    """Sampling on the GPU: each row's generator and its noise live on the logits' device; a seed answers the same
    twice beside a greedy row, with top-k, top-p, repetition penalty, min_new_tokens and logprobs all on."""
    chat = InternVLChat.from_pretrained(folder, device="cuda")
    ids = chat.prepare("Describe the picture.").prompt_ids
    sampled = SamplingParams(max_new_tokens=12, min_new_tokens=4, do_sample=True, temperature=0.8, top_k=20,
                             top_p=0.9, repetition_penalty=1.2, seed=7)

    def run():
        out = {0: [], 1: []}
        requests = [Request(ids, sampled, logprobs=2), Request(ids[:-2], SamplingParams(max_new_tokens=12))]
        for events in chat.engine.generate(requests):
            for e in events:
                out[e.rid].append((e.token, e.logprob))
        return out

    first = run()
    assert first == run()
    assert 4 <= len(first[0]) <= 12 and len(first[1]) >= 1
    assert all(logprob is not None and logprob <= 0 for _, logprob in first[0])


def test_compiled_bf16_decode_serves_other_batch_sizes_and_longer_prompts(folder):
    """reduce-overhead (CUDA graphs) in bf16: later generations with another batch size and a prompt past the first
    one's 256-slot bucket (new static buffers and shapes: torch records again) give every row its tokens."""
    chat = InternVLChat.from_pretrained(folder, device="cuda", compile=True)
    ids = chat.prepare("Describe the picture.").prompt_ids
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    for prompts in ([ids], [ids, ids[:-2], ids[:-4]], [ids * 5, ids], [ids]):
        counts = [0] * len(prompts)
        for events in chat.engine.generate([Request(p, params) for p in prompts]):
            for e in events:
                counts[e.rid] += 1
        assert counts == [16] * len(prompts)


def recorded_graphs() -> int:
    """How many CUDA graphs torch's graph trees hold for this thread and device."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    nodes = [node for roots in manager.roots.values() for node in roots] if manager is not None else []
    count = 0
    while nodes:
        node = nodes.pop()
        count += 1
        nodes += [child for children in node.children.values() for child in children]
    return count


def test_a_long_compiled_session_records_each_shape_once(folder):
    """reduce-overhead: graph trees record the step again for each new address of its mask and caches and keep
    every recording (not counted towards their re-record limit). A compiled engine gives each Generation the
    buffers of the one before, so after two rounds of chat and batch_chat turns (the second at the storages'
    final size) ten more rounds of the same shapes record nothing."""
    from torch._inductor import cudagraph_trees

    torch._dynamo.reset()
    cudagraph_trees.reset_cudagraph_trees()
    chat = InternVLChat.from_pretrained(folder, device="cuda", compile=True)
    questions = ["Hi", "Describe the picture in every detail. " * 40]  # one 256-slot bucket, then more

    def session():
        for question in questions:
            chat.chat(question, max_new_tokens=8, do_sample=False)
            chat.batch_chat([question, question + "?"], max_new_tokens=8, do_sample=False)

    session()
    session()
    first = recorded_graphs()
    assert first > 0
    for _ in range(10):
        session()
    assert recorded_graphs() == first


def test_a_device_map_on_gpus_with_device_given_as_a_torch_device_loads_in_bf16(folder):
    """`device=torch.device("cpu")` beside a map onto the GPU compared unequal to "cpu": the model loaded in fp32."""
    for device in ("cpu", torch.device("cpu")):
        model = InternVL.from_pretrained(folder, device=device, device_map={"": "cuda:0"})
        assert model.dtype == torch.bfloat16 and model.mlp1[0].weight.device.type == "cuda", device


def test_vit_embeds_on_the_cpu_reach_a_cuda_engine(folder):
    """Precomputed vision features given on the CPU: moved to the model's device, as pixel_values are."""
    chat = InternVLChat.from_pretrained(folder, device="cuda", dtype="float32")
    prepared = chat.prepare("What is it?", torch.randn(1, 3, 56, 56))
    with torch.no_grad():
        features = chat.model.extract_feature(prepared.pixel_values.cuda()).cpu()
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    tokens = {}
    for name, request in (("pixels", Request(prepared.prompt_ids, params, prepared.pixel_values)),
                          ("features", Request(prepared.prompt_ids, params, vit_embeds=features))):
        events = [e for step in chat.engine.generate([request]) for e in step]
        assert all(e.error is None for e in events), name
        tokens[name] = [e.token for e in events]
    assert tokens["features"] == tokens["pixels"]
