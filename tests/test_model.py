"""Parity of our InternVL with transformers' native InternVL / Qwen2 on random weights (fp32, CPU).

Every comparison loads the reference weights through our own checkpoint loader (see conftest).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.testing import assert_close

from internvl_mpo.errors import InputError
from internvl_mpo.projector import pixel_shuffle
from internvl_mpo.vision import VisionEmbeddings

from conftest import IMAGE_TOKEN_ID, tiny_config

TOL = dict(atol=1e-4, rtol=0)


def image_ids(n_tiles: int, per_tile: int, prefix=(5, 6), suffix=(7, 8, 9)) -> list[int]:
    return list(prefix) + [IMAGE_TOKEN_ID] * (n_tiles * per_tile) + list(suffix)


def hf_logits(ref, input_ids, pixel_values=None, attention_mask=None, position_ids=None):
    with torch.no_grad():
        return ref(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids
        ).logits


@pytest.mark.parametrize("variant", ["300m", "6b-style"])
def test_vision_tower_parity(reference_pair, variant):
    changes = {} if variant == "300m" else dict(norm_type="rms_norm", qk_normalization=True, qkv_bias=False)
    config = tiny_config(**changes)
    ref, ours = reference_pair(config)
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        expected = ref.model.vision_tower(pixel_values=pixels, output_hidden_states=True)
        assert_close(ours.vision_model(pixels), expected.last_hidden_state, **TOL)
        for layer in range(config.vision.num_hidden_layers + 1):  # select_layer semantics
            assert_close(ours.vision_model(pixels, select_layer=layer), expected.hidden_states[layer], **TOL)


def test_projector_parity(reference_pair, tiny):
    ref, ours = reference_pair(tiny)
    features = torch.randn(2, 4, 4, tiny.vision.hidden_size)
    with torch.no_grad():
        shuffled = ref.model.pixel_shuffle(features, scale_factor=0.5).reshape(2, -1, 4 * tiny.vision.hidden_size)
        assert torch.equal(pixel_shuffle(features), shuffled)
        assert_close(ours.mlp1(shuffled), ref.model.multi_modal_projector(shuffled), **TOL)
    # The closed form of the reference doc: token (i, j) = [x(2i,2j) | x(2i,2j+1) | x(2i+1,2j) | x(2i+1,2j+1)].
    out = pixel_shuffle(features).reshape(2, 2, 2, -1)
    c = tiny.vision.hidden_size
    assert torch.equal(out[:, 1, 0, :c], features[:, 2, 0])
    assert torch.equal(out[:, 1, 0, c : 2 * c], features[:, 2, 1])
    assert torch.equal(out[:, 1, 0, 2 * c : 3 * c], features[:, 3, 0])


def test_extract_feature_matches_reference(reference_pair, tiny):
    ref, ours = reference_pair(tiny)
    pixels = torch.randn(5, 3, 56, 56)
    with torch.no_grad():
        expected = ref.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                vision_feature_select_strategy="default").pooler_output
        assert_close(ours.extract_feature(pixels), expected, **TOL)


def test_decoder_parity_with_qwen2(reference_pair, tiny):
    from transformers import Qwen2ForCausalLM

    ref, ours = reference_pair(tiny)
    qwen = Qwen2ForCausalLM(ref.config.text_config).eval()
    qwen.set_attn_implementation("eager")
    qwen.model.load_state_dict(ref.model.language_model.state_dict())
    qwen.lm_head.load_state_dict(ref.lm_head.state_dict())
    ids = torch.randint(0, 290, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    with torch.no_grad():
        expected = qwen(input_ids=ids, attention_mask=mask).logits
        embeds = ours.language_model.model.embed_tokens(ids)
        positions = torch.arange(11).expand(2, 11)
        from internvl_mpo.llm import causal_mask

        got = ours.language_model(embeds, positions, causal_mask(mask))
    assert_close(got[0], expected[0], **TOL)
    assert_close(got[1, :7], expected[1, :7], **TOL)


@pytest.mark.parametrize("tiles", [0, 1, 13])
def test_full_model_parity(reference_pair, tiny, tiles):
    ref, ours = reference_pair(tiny)
    per = tiny.num_image_token
    ids = torch.tensor([image_ids(tiles, per)])
    pixels = torch.randn(tiles, 3, 56, 56) if tiles else None
    with torch.no_grad():
        got = ours(ids, pixel_values=pixels)
    assert_close(got, hf_logits(ref, ids, pixels), **TOL)


def test_two_images_parity(reference_pair, tiny):
    ref, ours = reference_pair(tiny)
    per = tiny.num_image_token
    ids = [5] + [IMAGE_TOKEN_ID] * (3 * per) + [6, 7] + [IMAGE_TOKEN_ID] * (1 * per) + [8, 9]
    ids = torch.tensor([ids])
    pixels = torch.randn(4, 3, 56, 56)  # image 1: 3 tiles, image 2: 1 tile
    with torch.no_grad():
        assert_close(ours(ids, pixel_values=pixels), hf_logits(ref, ids, pixels), **TOL)


def test_padded_batch_parity(reference_pair, tiny):
    """Batch of 2 with left padding: our positions come from the mask; the reference gets them explicitly."""
    ref, ours = reference_pair(tiny)
    per = tiny.num_image_token
    long = image_ids(2, per, prefix=(5, 6, 7, 8))
    short = image_ids(1, per)
    pad = len(long) - len(short)
    ids = torch.tensor([long, [0] * pad + short])
    mask = torch.tensor([[1] * len(long), [0] * pad + [1] * len(short)])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        got = ours(ids, pixel_values=pixels, attention_mask=mask)
        expected = hf_logits(ref, ids, pixels, attention_mask=mask, position_ids=positions)
        alone = ours(torch.tensor([short]), pixel_values=pixels[2:])
    assert not got.isnan().any()
    assert_close(got[0], expected[0], **TOL)
    assert_close(got[1, pad:], expected[1, pad:], **TOL)
    assert_close(got[1, pad:], alone[0], **TOL)  # padding changes nothing for the real tokens


def test_image_token_count_mismatch_raises(reference_pair, tiny):
    _, ours = reference_pair(tiny)
    ids = torch.tensor([image_ids(1, tiny.num_image_token)])
    with pytest.raises(InputError, match="4 <IMG_CONTEXT> tokens but the images give 8"):
        ours(ids, pixel_values=torch.randn(2, 3, 56, 56))
    with pytest.raises(InputError, match="4 <IMG_CONTEXT> tokens but the images give 0"):
        ours(ids)


def test_input_ids_that_are_not_a_batch_tensor_are_refused_by_name(reference_pair, tiny):
    """prepare()'s prompt_ids is a list: passed as it is, or as a 1-D tensor, the forward failed deep in torch
    (an embedding TypeError, or "not enough values to unpack")."""
    _, ours = reference_pair(tiny)
    ids = image_ids(1, tiny.num_image_token)
    pixels = torch.randn(1, 3, 56, 56)
    n = len(ids)
    for wrong, got in ((ids, "list"), (torch.tensor(ids), rf"a torch.int64 tensor of shape \({n},\)"),
                       (torch.tensor([ids], dtype=torch.float), rf"a torch.float32 tensor of shape \(1, {n}\)")):
        with pytest.raises(InputError, match=rf"input_ids must be a \(B, T\) tensor of token ids, got {got}; "):
            ours(wrong, pixel_values=pixels)
    assert ours(torch.tensor([ids]), pixel_values=pixels).shape == (1, n, tiny.llm.vocab_size)


def test_an_attention_mask_of_another_shape_than_input_ids_is_refused_by_name(reference_pair, tiny):
    """A mask of another length (one built for another padding) or a 1-D one failed deep in torch ("The size of
    tensor a (n) must match ...", "not enough values to unpack"), or where all ones, passed or broke RoPE."""
    _, ours = reference_pair(tiny)
    ids = torch.tensor([image_ids(1, tiny.num_image_token)])
    pixels = torch.randn(1, 3, 56, 56)
    n = ids.shape[1]
    for wrong in (torch.ones(1, 3), torch.ones(n), torch.ones(2, n), torch.tensor([[0] + [1] * (n - 2)])):
        shape = str(tuple(wrong.shape)).replace("(", r"\(").replace(")", r"\)")
        with pytest.raises(InputError, match=rf"attention_mask must have the shape of input_ids, \(1, {n}\), got {shape}"):
            ours(ids, pixel_values=pixels, attention_mask=wrong)
    assert_close(ours(ids, pixel_values=pixels, attention_mask=torch.ones(1, n)), ours(ids, pixel_values=pixels))


def test_native_size_skips_interpolation_bit_exactly(tiny):
    torch.manual_seed(0)
    emb = VisionEmbeddings(tiny.vision)
    torch.nn.init.normal_(emb.position_embedding)
    grid = emb.grid
    table = emb.position_embedding
    resized = torch.nn.functional.interpolate(
        table[:, 1:].float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2),
        size=(grid, grid), mode="bicubic", align_corners=False,
    ).reshape(1, -1, grid * grid).permute(0, 2, 1)
    assert torch.equal(torch.cat([table[:, :1], resized], dim=1), emb.position_table(grid, grid, torch.float32))


def test_class_embedding_gradient_has_the_parameters_layout(tiny):
    """DDP copies a gradient whose strides differ from its bucket (and warns at every step); a single
    tile must not give the CLS parameter a strided slice of the embeddings' gradient."""
    torch.manual_seed(0)
    emb = VisionEmbeddings(tiny.vision)
    for p in emb.parameters():
        torch.nn.init.normal_(p)
    size = tiny.vision.image_size
    for tiles in (1, 3):
        emb.zero_grad(set_to_none=True)
        emb(torch.randn(tiles, 3, size, size)).square().sum().backward()
        assert emb.class_embedding.grad.stride() == emb.class_embedding.stride(), tiles


def test_integer_pixel_values_are_refused_by_the_vision_tower(tiny):
    """Raw uint8 pixels are not tiles: refused by name, not cast to floats and encoded as if normalised."""
    emb = VisionEmbeddings(tiny.vision)
    size = tiny.vision.image_size
    raw = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    with pytest.raises(InputError, match="pixel_values must be floating point .* got torch.uint8"):
        emb(raw)
    assert emb(raw.float()).shape[0] == 1  # floating point tiles are still cast to the weights' dtype


def test_tiles_the_pixel_shuffle_cannot_join_are_refused_by_name(tiny):
    """Tiles that are not square, or whose side is no multiple of two patches, raised a reshape error from inside
    the model (or, 2 pixels past a multiple, were cut silently by the patch convolution); other such sides still
    interpolate the position grid as the reference does."""
    from internvl_mpo.model import InternVL

    model = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID).eval()
    size, block = tiny.vision.image_size, 2 * tiny.vision.patch_size
    for shape in [(1, 3, size, size // 2), (1, 3, block // 2, block // 2), (1, 3, 10, 10), (1, 3, size + 2, size + 2)]:
        with pytest.raises(InputError, match=rf"square tiles whose side is a multiple of {block} pixels .* got "
                                             rf"\({', '.join(map(str, shape))}\)"):
            model.extract_feature(torch.zeros(shape))
    with torch.no_grad():
        assert model.extract_feature(torch.zeros(2, 3, 2 * block, 2 * block)).shape == (2, 4, tiny.llm.hidden_size)
        assert model.extract_feature(torch.zeros(1, 3, size, size)).shape[1] == model.num_image_token


def test_other_tile_size_interpolates_like_reference(reference_pair, tiny):
    """A 70x70 input (5x5 patches) resizes the 4x4 position grid bicubically, as the reference does."""
    ref, ours = reference_pair(tiny)
    pixels = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        expected = ref.model.vision_tower.embeddings(pixels)
        assert_close(ours.vision_model.embeddings(pixels), expected, **TOL)


def test_bf16_forward_runs_close_to_fp32(reference_pair, tiny):
    _, ours = reference_pair(tiny)
    ids = torch.tensor([image_ids(1, tiny.num_image_token)])
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        full = ours(ids, pixel_values=pixels)
        half = ours.to(torch.bfloat16)(ids, pixel_values=pixels)
    assert half.dtype == torch.bfloat16
    assert_close(half.float(), full, atol=0.1, rtol=0.05)


def test_bf16_forward_equals_transformers_bf16(reference_pair, tiny):
    """bf16 weights: the logits and image features equal transformers' bit for bit (RMSNorm in fp32, RoPE
    tables in fp32 cast to bf16, the ViT's layer scale, the projector's LayerNorm, SDPA attention)."""
    ref, ours = reference_pair(tiny)
    rotary = ref.model.language_model.rotary_emb
    inv_freq = rotary.inv_freq
    ref = ref.to(torch.bfloat16)
    rotary.inv_freq = inv_freq  # fp32, as transformers' from_pretrained(dtype=bfloat16) leaves it (.to rounds it)
    ref.set_attn_implementation("sdpa")
    ours = ours.to(torch.bfloat16)
    ids = torch.tensor([image_ids(1, tiny.num_image_token, suffix=tuple(range(10, 60)))])
    pixels = torch.randn(1, 3, 56, 56, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = hf_logits(ref, ids, pixels)
        features = ref.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                vision_feature_select_strategy="default").pooler_output
        assert torch.equal(ours.extract_feature(pixels), features)
        assert torch.equal(ours(ids, pixel_values=pixels), expected)


def test_tied_head_config_shares_the_embedding(tiny):
    from internvl_mpo.model import InternVL

    config = tiny.replace(llm=dataclasses.replace(tiny.llm, tie_word_embeddings=True))
    model = InternVL(config, image_token_id=IMAGE_TOKEN_ID)
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight
    assert "language_model.lm_head.weight" not in model.expected_keys()


def test_few_row_linear_matches_nn_linear():
    """The decoder's Linear takes a blocked bmm for one row and a bmm over row blocks for 2-16 rows against
    an fp32 CPU weight of 64K entries or more: the same values up to fp32 rounding there, and exactly
    nn.Linear's everywhere else (more rows, smaller weights, bf16, 2-16 rows where no row block divides)."""
    from internvl_mpo.llm import Linear

    torch.manual_seed(0)
    for bias in (True, False):
        big = Linear(1024, 1024, bias=bias)
        plain = torch.nn.Linear(1024, 1024, bias=bias)
        plain.load_state_dict(big.state_dict())
        with torch.no_grad():
            for shape in [(1, 1024), (1, 1, 1024), (2, 1024), (4, 1, 1024), (1, 3, 1024), (2, 8, 1024)]:
                x = torch.randn(shape)
                assert big(x).shape == plain(x).shape
                assert_close(big(x), plain(x), rtol=1e-5, atol=1e-5)
            for shape in [(17, 1024), (3, 6, 1024)]:
                x = torch.randn(shape)
                assert torch.equal(big(x), plain(x))
            for rows in (1, 3):
                x = torch.randn(rows, 1024).bfloat16()
                assert torch.equal(big.bfloat16()(x), plain.bfloat16()(x))
    middle = Linear(256, 256)  # 64K entries: the few-row forms
    with torch.no_grad():
        for rows in (1, 3):
            x = torch.randn(rows, 256)
            assert_close(middle(x), torch.nn.functional.linear(x, middle.weight, middle.bias), rtol=1e-5, atol=1e-5)
    small = Linear(64, 64)
    for rows in (1, 3):
        x = torch.randn(rows, 64)
        assert torch.equal(small(x), torch.nn.functional.linear(x, small.weight, small.bias))
    prime = Linear(256, 257)  # 257 rows: no row block
    with torch.no_grad():
        for rows in (2, 4, 16):
            x = torch.randn(rows, 256)
            assert torch.equal(prime(x), torch.nn.functional.linear(x, prime.weight, prime.bias))


def test_row_blocks_are_the_largest_divisor_that_fits_half_a_megabyte():
    from internvl_mpo.llm import row_block

    assert row_block(4864, 896) == 128  # 448 KB; 152 rows (532 KB) would not fit
    assert row_block(896, 4864) == 16  # 304 KB
    assert row_block(151674, 64) == 1487  # 372 KB: 151674 = 2 * 3 * 17 * 1487
    assert row_block(1024, 64) == 512  # at most half the rows: two blocks or more
    assert row_block(257, 256) is None  # a prime: one-row blocks, under 64 KB
    assert row_block(4099 * 2, 896) is None  # blocks of 2 rows (7 KB)
    assert row_block(151674, 896) == 102  # 357 KB
    assert row_block(1, 64) is None and row_block(4, 1 << 18) is None  # one row; rows over 512 KB
    for out_features in [*range(2, 3000), 151674, 151655, 92553, 32000]:  # against the plain search
        for in_features in (64, 160, 896):
            most = min(out_features // 2, (512 << 10) // (4 * in_features))
            rows = max(r for r in range(1, most + 1) if out_features % r == 0) if most else 0
            expected = rows if rows * 4 * in_features >= 64 << 10 else None
            assert row_block(out_features, in_features) == expected, (out_features, in_features)


def test_linear_decides_once_whether_its_weight_takes_the_few_row_forms(monkeypatch):
    """A weight under FEW_ROWS_MIN_ENTRIES goes straight to F.linear: its forward never asks
    few_rows_matmul (a decode step calls it 14 times on the tiny config)."""
    from internvl_mpo import llm

    asked = []
    real = llm.few_rows_matmul
    monkeypatch.setattr(llm, "few_rows_matmul", lambda *a: asked.append(a[1].shape) or real(*a))
    x = torch.randn(1, 256)
    with torch.no_grad():
        llm.Linear(64, 64)(x[:, :64])
        llm.Linear(256, 256)(x)
    assert asked == [(256, 256)]


def test_blocked_matvec_splits_the_rows_over_the_threads():
    """One row against a large fp32 CPU weight is one bmm over as many equal row blocks as there are
    threads (or the largest divisor of the row count below that); one thread, no divisor or bf16
    leave it to the plain matmul."""
    from internvl_mpo.llm import blocked_matvec

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    try:
        x = torch.randn(1, 1, 64)
        for rows, count in [(6 * 7, 4), (7, 4), (10, 3)]:
            torch.set_num_threads(count)
            weight = torch.randn(rows, 64)
            out = blocked_matvec(x, weight)
            if rows == 7:
                assert out is None  # 7 rows: no divisor between 2 and 4
                continue
            assert out.shape == (1, 1, rows)
            assert_close(out, x @ weight.T, rtol=1e-5, atol=1e-5)
            bias = torch.randn(rows)
            assert_close(blocked_matvec(x, weight, bias), x @ weight.T + bias, rtol=1e-5, atol=1e-5)
            # a row inside a larger tensor (a storage offset), and one with a stride between its entries
            states = torch.randn(1, 5, 64)
            assert_close(blocked_matvec(states[:, 3], weight), states[:, 3] @ weight.T, rtol=1e-5, atol=1e-5)
            spread = torch.randn(1, 64, 2)[..., 1]
            assert_close(blocked_matvec(spread, weight), spread @ weight.T, rtol=1e-5, atol=1e-5)
        torch.set_num_threads(1)
        assert blocked_matvec(x, weight) is None
        torch.set_num_threads(2)
        assert blocked_matvec(x.bfloat16(), weight.bfloat16()) is None
        assert blocked_matvec(x, torch.randn(64, 10).T) is None  # a transposed view
    finally:
        torch.set_num_threads(threads)


def test_a_tied_model_saves_its_head_untied_for_the_official_loader(tmp_path, tiny):
    from safetensors import safe_open

    from internvl_mpo.model import InternVL

    config = tiny.replace(llm=dataclasses.replace(tiny.llm, tie_word_embeddings=True))
    model = InternVL(config, image_token_id=IMAGE_TOKEN_ID)
    model.init_weights()
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False and saved["llm_config"]["tie_word_embeddings"] is False
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("language_model.lm_head.weight"), model.language_model.lm_head.weight)
    loaded = InternVL.from_pretrained(tmp_path / "m", image_token_id=IMAGE_TOKEN_ID)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_an_untied_head_is_loaded_even_when_llm_config_says_tied(tmp_path, tiny):
    from internvl_mpo.model import InternVL

    model = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
    model.init_weights()
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    d = json.loads(path.read_text())
    d["llm_config"]["tie_word_embeddings"] = d["tie_word_embeddings"] = True
    path.write_text(json.dumps(d))
    loaded = InternVL.from_pretrained(tmp_path / "m", image_token_id=IMAGE_TOKEN_ID)
    assert torch.equal(loaded.language_model.lm_head.weight, model.language_model.lm_head.weight)
    assert loaded.language_model.lm_head.weight is not loaded.language_model.model.embed_tokens.weight


def test_model_built_without_init_weights_holds_defined_numbers(tiny):
    # The layer scales and position tables were torch.empty: a model built and saved without init_weights()
    # held whatever the memory held (now and then NaN, which the loader then refused).
    from internvl_mpo.model import InternVL

    model = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
    for layer in model.vision_model.encoder.layers:
        assert torch.equal(layer.ls1, torch.full_like(layer.ls1, tiny.vision.initializer_factor))
        assert torch.equal(layer.ls2, torch.full_like(layer.ls2, tiny.vision.initializer_factor))
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert float(model.vision_model.embeddings.position_embedding.detach().std()) > 0.5  # drawn, not left at zero


def test_dtype_auto_reads_the_newer_dtype_key(tmp_path, tiny):
    from internvl_mpo.model import InternVL

    InternVL(tiny, image_token_id=IMAGE_TOKEN_ID).save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    d = json.loads(path.read_text())
    d.pop("torch_dtype")
    d["dtype"] = "bfloat16"
    path.write_text(json.dumps(d))
    assert InternVL.from_pretrained(tmp_path / "m", dtype="auto").dtype == torch.bfloat16


def test_dtype_auto_without_a_config_dtype_takes_the_weights_dtype_as_transformers(tmp_path, tiny):
    """A bf16 checkpoint whose config.json names no dtype loaded in fp32 (twice the memory). transformers
    takes the index metadata's "dtype", else the first floating-point weight by name of the single file
    or the first shard; so do we, from the headers."""
    from safetensors.torch import load_file, save_file

    from internvl_mpo.model import InternVL

    from conftest import write_checkpoint

    model = InternVL(tiny, image_token_id=IMAGE_TOKEN_ID)
    model.init_weights()  # values torch.empty left could overflow float16
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    for shards in (1, 2):
        folder = write_checkpoint(tmp_path / f"s{shards}", tiny, state, shards=shards)
        assert "torch_dtype" not in json.loads((folder / "config.json").read_text())
        assert InternVL.from_pretrained(folder, dtype="auto").dtype == torch.bfloat16
    index = tmp_path / "s2" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    index.write_text(json.dumps({**data, "metadata": {**data["metadata"], "dtype": "float16"}}))
    assert InternVL.from_pretrained(tmp_path / "s2", dtype="auto").dtype == torch.float16
    mixed = load_file(tmp_path / "s1" / "model.safetensors")  # the first weight by name decides, as in transformers
    first = min(mixed)
    save_file({**mixed, first: mixed[first].to(torch.float32)}, tmp_path / "s1" / "model.safetensors")
    assert InternVL.from_pretrained(tmp_path / "s1", dtype="auto").dtype == torch.float32
    save_file({**mixed, first: mixed[first].to(torch.float8_e4m3fn)}, tmp_path / "s1" / "model.safetensors")
    with pytest.raises(InputError, match="dtype 'auto': the checkpoint's dtype is 'float8_e4m3fn'"):
        InternVL.from_pretrained(tmp_path / "s1", dtype="auto")


def test_saving_in_another_dtype_rewrites_the_newer_dtype_key_too(tmp_path, tiny):
    from internvl_mpo.model import InternVL

    InternVL(tiny, image_token_id=IMAGE_TOKEN_ID).save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    d = json.loads(path.read_text())
    d["dtype"] = d.pop("torch_dtype")  # float32, as transformers >= 4.56 writes it
    path.write_text(json.dumps(d))
    InternVL.from_pretrained(tmp_path / "m").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    saved = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert saved["dtype"] == saved["torch_dtype"] == "bfloat16"


def test_save_pretrained_expands_a_home_folder_as_from_pretrained_does(tmp_path, tiny, monkeypatch):
    from internvl_mpo.model import InternVL

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    InternVL(tiny, image_token_id=IMAGE_TOKEN_ID).save_pretrained("~/m")
    assert (tmp_path / "home" / "m" / "model.safetensors").exists() and not (tmp_path / "~").exists()
    assert InternVL.from_pretrained("~/m").config == tiny


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_transformers_bit_for_bit(dtype):
    """fp32 takes torch's fused rms_norm, other dtypes the written-out form; both equal transformers'
    Qwen2RMSNorm exactly."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from internvl_mpo.vision import RMSNorm

    torch.manual_seed(0)
    for width, eps in [(64, 1e-6), (896, 1e-6), (2048, 1e-5)]:
        ours, theirs = RMSNorm(width, eps), Qwen2RMSNorm(width, eps)
        with torch.no_grad():
            theirs.weight.copy_(torch.randn(width))
        ours.load_state_dict(theirs.state_dict())
        ours, theirs = ours.to(dtype), theirs.to(dtype)
        for rows in (1, 7, 300):
            x = (torch.randn(2, rows, width) * torch.rand(2, rows, 1) * 10).to(dtype)
            with torch.no_grad():
                assert torch.equal(ours(x), theirs(x)), (width, rows)


def test_the_pad_row_gets_no_gradient_as_in_transformers_qwen2(tiny):
    """transformers' Qwen2Model builds its embedding with padding_idx=pad_token_id: the pad row is left out
    of training. Ours had no padding_idx, and the pad tokens of a batch trained that row."""
    from transformers import Qwen2ForCausalLM as ReferenceQwen2

    from conftest import hf_config
    from internvl_mpo.llm import Qwen2ForCausalLM, causal_mask

    pad = 7
    text = hf_config(tiny).text_config
    text.pad_token_id = pad
    ref = ReferenceQwen2(text)
    ref.set_attn_implementation("eager")
    ours = Qwen2ForCausalLM(dataclasses.replace(tiny.llm, extra={"pad_token_id": pad}))
    ours.init_weights()
    assert ours.input_embeddings().weight[pad].abs().sum() == 0  # as transformers initialises it
    ours.load_state_dict(ref.state_dict())
    ids = torch.tensor([[5, 9, 11, 3, pad, pad], [4, pad, 12, 6, 8, pad]])
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # right padding, and a pad id inside the text
    def loss(logits):  # over the real positions (padded ones are computed differently, and unused)
        return (logits * mask[..., None]).square().mean()

    loss(ref(input_ids=ids, attention_mask=mask).logits).backward()
    loss(ours(ours.input_embeddings()(ids), torch.arange(6).expand(2, 6), causal_mask(mask))).backward()
    expected, got = ref.model.embed_tokens.weight.grad, ours.input_embeddings().weight.grad
    assert expected[pad].abs().sum() == 0 and expected[ids[ids != pad]].abs().sum(-1).min() > 0
    assert_close(got, expected, **TOL)


def test_a_pad_token_id_outside_the_vocabulary_is_refused_at_config_load(tmp_path, tiny):
    from internvl_mpo.config import ModelConfig
    from internvl_mpo.errors import ConfigError

    path = tmp_path / "config.json"
    for pad in (tiny.llm.vocab_size, -1, "7", True):  # nn.Embedding fails with a bare assertion or counts from the end
        d = json.loads(tiny.to_json_text())
        d["llm_config"]["pad_token_id"] = pad
        path.write_text(json.dumps(d))
        with pytest.raises(ConfigError, match=rf"config.json: llm_config.pad_token_id {pad!r} is not a token id"
                                              rf" below {tiny.llm.vocab_size}"):
            ModelConfig.from_json(path)


def test_drop_path_rates_rise_linearly_over_the_vit_layers(tiny):
    """As the official encoder: layer k drops a sample with linspace(0, drop_path_rate, L)[k] (reference doc)."""
    from internvl_mpo.vision import InternVisionModel

    vision = dataclasses.replace(tiny.vision, num_hidden_layers=5, drop_path_rate=0.1)
    rates = [layer.drop_path.rate for layer in InternVisionModel(vision).encoder.layers]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 5).tolist())


def test_drop_path_drops_whole_samples_and_scales_the_kept_ones(tiny):
    """timm's DropPath, as the official ViT uses it: in training each sample is zeroed whole with the rate and the
    others divided by 1 - rate, so the expected output is the input; in eval nothing changes."""
    from internvl_mpo.vision import DropPath

    drop = DropPath(0.25)
    x = torch.rand(400, 3, 5) + 1  # no zeros
    out = drop(x)
    dropped = out.flatten(1).eq(0).all(1)
    assert 50 < int(dropped.sum()) < 150
    assert torch.equal(out[~dropped], x[~dropped] / 0.75)
    assert torch.equal(drop.eval()(x), x)


def test_projector_layer_norm_uses_pytorchs_default_eps_as_the_reference(reference_pair, tiny):
    """mlp1's LayerNorm keeps eps 1e-5 while the ViT's norms use 1e-6 (reference doc): features of small spread,
    where the two differ, still give the reference's projection."""
    ref, ours = reference_pair(tiny)
    shuffled = 1e-3 * torch.randn(2, 4, 4 * tiny.vision.hidden_size)
    with torch.no_grad():
        assert_close(ours.mlp1(shuffled), ref.model.multi_modal_projector(shuffled), **TOL)


def test_linear_rope_scaling_equals_transformers_qwen2(tiny):
    """llm_config.rope_scaling {"type": "linear", "factor": f} divides the positions by f, as transformers' Qwen2."""
    from transformers import Qwen2ForCausalLM as ReferenceQwen2

    from conftest import hf_config
    from internvl_mpo.llm import Qwen2ForCausalLM

    text = hf_config(tiny).text_config.to_dict()
    text["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    ref = ReferenceQwen2(type(hf_config(tiny).text_config)(**text)).eval()
    ref.set_attn_implementation("eager")
    scaling = {"type": "linear", "factor": 4.0}
    ours = Qwen2ForCausalLM(dataclasses.replace(tiny.llm, rope_theta=10000.0, rope_scaling=scaling))
    ours.load_state_dict(ref.state_dict())
    ids = torch.randint(0, tiny.llm.vocab_size, (1, 40))
    with torch.no_grad():
        got = ours(ours.input_embeddings()(ids), torch.arange(40)[None])
        assert_close(got, ref(input_ids=ids).logits, **TOL)


def test_causal_mask_lets_a_query_without_real_keys_attend_to_itself():
    """A left-padded query sees no real key: it attends to itself, so that no row is fully masked (SDPA gives NaN
    there on some kernels, which later layers pass on through keys weighted 0)."""
    from internvl_mpo.llm import causal_mask

    expected = torch.tensor([
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]],  # left padding
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],  # right padding: the pad query sees the text
    ], dtype=torch.bool)[:, None]
    assert torch.equal(causal_mask(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])), expected)


def test_attention_dropout_of_the_config_applies_in_training_only(reference_pair, tiny):
    """vision_config and llm_config attention_dropout drop attention weights in training only, as in transformers:
    an eval forward gives the reference's logits."""
    from internvl_mpo.model import InternVL

    ref, ours = reference_pair(tiny)
    config = tiny.replace(vision=dataclasses.replace(tiny.vision, attention_dropout=0.5),
                          llm=dataclasses.replace(tiny.llm, attention_dropout=0.5))
    model = InternVL(config, image_token_id=IMAGE_TOKEN_ID)
    model.load_state_dict(ours.state_dict())
    ids = torch.tensor([image_ids(1, tiny.num_image_token)])
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = hf_logits(ref, ids, pixels)
        assert_close(model.eval()(ids, pixel_values=pixels), expected, **TOL)
        assert not torch.allclose(model.train()(ids, pixel_values=pixels), expected, atol=1e-2)


def test_vision_config_dropout_drops_the_attention_output_in_training_only(tiny):
    """vision_config.dropout is the official InternAttention's proj_drop, after the output projection: it was not
    read. At 1.0 every attention output is dropped in training (the block returns zeros); eval keeps it."""
    from internvl_mpo.vision import VisionAttention

    attention = VisionAttention(dataclasses.replace(tiny.vision, dropout=1.0))
    x = torch.randn(2, 5, tiny.vision.hidden_size)
    assert torch.equal(attention.train()(x), torch.zeros_like(x))
    assert attention.eval()(x).abs().sum() > 0


def test_tiles_flagged_zero_give_no_features_as_in_the_official_forward(reference_pair, tiny):
    """image_flags (N,) as the official forward reads them: the features of tiles flagged 0 (a text-only sample's
    dummy tile) are dropped before the splice."""
    ref, ours = reference_pair(tiny)
    ids = torch.tensor([image_ids(1, tiny.num_image_token)])
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        got = ours(ids, pixel_values=pixels, image_flags=torch.tensor([0, 1, 0]))
        assert_close(got, hf_logits(ref, ids, pixels[1:2]), **TOL)


@pytest.mark.parametrize("rows", [1, 3])
def test_a_decode_steps_grouped_attention_equals_sdpas_gqa(rows):
    """A decode step (one query, an additive mask) puts each KV head's query heads on the query axis instead of
    enable_gqa, which with a mask has no fused kernel on CUDA: the same values as SDPA's grouped attention."""
    import torch.nn.functional as F

    from internvl_mpo.llm import attend

    heads, kv_heads, dim, span = 14, 2, 16, 37
    q, k, v = torch.randn(rows, heads, 1, dim), torch.randn(rows, kv_heads, span, dim), torch.randn(rows, kv_heads,
                                                                                                     span, dim)
    mask = torch.zeros(rows, 1, 1, span)
    mask[0, :, :, :5] = float("-inf")  # a left-padded row
    cos, sin = torch.ones(1, 1, dim), torch.zeros(1, 1, dim)  # no rotation
    got = attend(q, k, v, cos, sin, mask, None, None, 0.0, True)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    assert got.shape == (rows, 1, heads * dim)
    assert_close(got, expected.reshape(rows, 1, -1), rtol=1e-5, atol=1e-6)
