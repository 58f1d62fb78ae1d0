"""InternVL: InternViT -> pixel shuffle -> mlp1 -> Qwen2, with image features spliced into the text.

Mirrors `InternVLChatModel` in OpenGVLab/InternVL `modeling_internvl_chat.py` (`extract_feature`,
`forward`), without its loss, prompt building and hidden state. Differences on purpose:
- a count mismatch between `<IMG_CONTEXT>` tokens and image feature rows raises (the official
  training forward prints a warning, truncates and zeroes the SFT loss; MPO's losses, computed from its
  logits, still train on the sample);
- with an attention mask and no explicit position ids, positions count real tokens only, so a
  left-padded sequence gets the same logits as the unpadded one (the official generate() path does
  the same; a plain forward there uses 0..T-1).
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import LLMConfig, ModelConfig
from .errors import CheckpointError, InputError
from .internlm2 import InternLM2ForCausalLM
from .llm import Qwen2ForCausalLM, causal_mask
from .projector import make_projector, pixel_shuffle
from .vision import InternVisionModel

if TYPE_CHECKING:
    from .checkpoint import Weights

IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"


# load_image's tiles lie in -2.12..2.64 (ImageNet mean and std); a resize of float tensors (transformers' fast
# processors) overshoots a little, and random test tiles reach 5. Raw 0..255 values, or NaN from a division by
# zero, are no tiles.
MAX_TILE_VALUE = 10.0


def check_tile_values(pixel_values: torch.Tensor) -> None:
    """Refuse tiles that are no normalised pixels: an integer tensor (a raw picture's 0..255), NaN, inf or a value
    past MAX_TILE_VALUE (the vision encoder would answer them all without a word, NaN as token 0)."""
    if not pixel_values.is_floating_point():
        raise InputError(f"pixel_values must be floating point tiles normalised as load_image makes them, got "
                         f"{pixel_values.dtype}; give raw pictures as files or PIL images")
    if pixel_values.numel() == 0:  # the count of tiles is checked against the prompt's placeholders
        return
    if pixel_values.is_meta:  # torch's "Tensor.item() cannot be called on meta tensors" below
        raise InputError("pixel_values are on the meta device, which holds no values; give tiles with values")
    low, high = torch.aminmax(pixel_values)  # one pass, no copy of the tiles
    largest = float(torch.maximum(-low, high))  # NaN if any is
    if not largest <= MAX_TILE_VALUE:
        raise InputError(f"pixel_values must be tiles normalised as load_image makes them (-2.12 to 2.64), got a "
                         f"value of magnitude {largest:g}; give raw pictures as files or PIL images")


def splice_image_embeddings(
    input_ids: torch.Tensor, input_embeds: torch.Tensor, image_embeds: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Each `image_token_id` position in input_ids (B, T) takes the next row of image_embeds (R, C)."""
    slots = input_ids == image_token_id  # (B, T)
    n_slots = int(slots.sum())
    if n_slots != image_embeds.shape[0]:
        raise InputError(
            f"the prompt has {n_slots} {IMG_CONTEXT_TOKEN} tokens but the images give {image_embeds.shape[0]} "
            "feature rows; each tile needs exactly num_image_token context tokens, in order"
        )
    if n_slots == 0:
        return input_embeds
    return input_embeds.masked_scatter(slots[..., None], image_embeds.to(input_embeds.dtype))


def context_token_id(folder: Path, vocab_size: int, given: int | None = None) -> int | None:
    """`given`, else the id of `<IMG_CONTEXT>` in `folder`'s tokenizer files (None without one). An id outside the
    vocabulary is refused: embedding it failed deep inside (on CUDA with a device-side assert)."""
    from . import companions

    found = companions.find_token_id(folder, IMG_CONTEXT_TOKEN) if given is None else given
    if found is None or 0 <= found < vocab_size:
        return found
    if given is not None:
        raise InputError(f"{folder}: image_token_id {given} ({IMG_CONTEXT_TOKEN}) is outside the model's vocabulary "
                         f"(llm_config.vocab_size {vocab_size})")
    raise CheckpointError(f"{folder}: the tokenizer files give {IMG_CONTEXT_TOKEN} the id {found}, outside the model's "
                          f"vocabulary (llm_config.vocab_size {vocab_size}): they are another model's; copy this "
                          "model's tokenizer files there")


def default_position_ids(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """(B, T) positions: 0..T-1, or counting real tokens only when a padding mask is given."""
    if attention_mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_language_model(config: LLMConfig) -> nn.Module:
    """The decoder named by llm_config.architectures (Qwen2 or InternLM2)."""
    if config.architectures[0] == "InternLM2ForCausalLM":
        return InternLM2ForCausalLM(config)
    return Qwen2ForCausalLM(config)


class InternVL(nn.Module):
    def __init__(self, config: ModelConfig, image_token_id: int | None = None):
        super().__init__()
        self.config = config
        self.image_token_id = image_token_id
        self.source_dir: Path | None = None  # set by from_pretrained; save_pretrained copies its files
        self.tokenizer_dir: Path | None = None  # where the tokenizer files come from, when not source_dir
        self.vision_model = InternVisionModel(config.vision)
        # `mlp1` is the official name of the projector.
        self.mlp1 = make_projector(config.vision.hidden_size, config.llm.hidden_size, config.downsample_ratio)
        self.language_model = build_language_model(config.llm)

    @property
    def device(self) -> torch.device:
        return self.mlp1[1].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp1[1].weight.dtype

    @property
    def num_image_token(self) -> int:
        return self.config.num_image_token

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) tiles -> (N, num_image_token, llm_hidden) image embeddings."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.vision.num_channels:
            raise InputError(f"pixel_values must be (tiles, 3, H, W), got {tuple(pixel_values.shape)}")
        size, block = pixel_values.shape[-1], 2 * self.config.vision.patch_size  # the shuffle joins 2 x 2 patches
        if pixel_values.shape[-2] != size or size % block or size == 0:
            raise InputError(f"pixel_values must hold square tiles whose side is a multiple of {block} pixels "
                             f"(load_image makes {self.config.vision.image_size} x {self.config.vision.image_size}), "
                             f"got {tuple(pixel_values.shape)}")
        vit_embeds = self.vision_model(pixel_values, self.config.select_layer)[:, 1:]  # drop CLS: (N, P, C)
        n, p, c = vit_embeds.shape
        side = int(p**0.5)
        vit_embeds = pixel_shuffle(vit_embeds.reshape(n, side, side, c))  # (N, P/4, 4C)
        if self.vision_model.embeddings.patch_embedding.weight.dtype != self.dtype:  # a ViT cast apart (fp32 ViT)
            vit_embeds = vit_embeds.to(self.dtype)
        return self.mlp1(vit_embeds)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
        vit_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings (B, T, C) with image features spliced in at the context tokens.

        `vit_embeds` are precomputed `extract_feature` outputs (to encode shared images once);
        `image_flags` (N,) drop the features of tiles flagged 0 (official dummy tiles).
        """
        if not (isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2 and input_ids.numel()
                and input_ids.dtype in (torch.int64, torch.int32)):  # what an embedding looks up
            got = (f"a {input_ids.dtype} tensor of shape {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
                   else type(input_ids).__name__)
            raise InputError(f"input_ids must be a (B, T) tensor of token ids, got {got}; it takes int64 or int32 ids, "
                             "at least one, and torch.tensor([ids]) makes a batch of one from a list of ids")
        table = self.language_model.input_embeddings()
        outside = (input_ids < 0) | (input_ids >= table.num_embeddings)
        if bool(outside.any()):  # the lookup would fail deep inside (on CUDA with a device-side assert)
            raise InputError(f"input_ids hold {int(input_ids[outside][0])}, outside the vocabulary "
                             f"0..{table.num_embeddings - 1}")
        embeds = table(input_ids)
        if pixel_values is not None and vit_embeds is None:
            vit_embeds = self.extract_feature(pixel_values)
        if vit_embeds is None:
            rows = embeds.new_zeros(0, embeds.shape[-1])
        else:
            if image_flags is not None:
                vit_embeds = vit_embeds[image_flags.bool()]
            rows = vit_embeds.reshape(-1, vit_embeds.shape[-1])
        if self.image_token_id is None:
            if rows.shape[0]:
                raise InputError("this model has no image_token_id (no tokenizer files); pass image_token_id=")
            return embeds
        return splice_image_embeddings(input_ids, embeds, rows, self.image_token_id)

    def hidden_states(
        self,
        input_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final LLM hidden states (B, T, C) for embeddings, causal, padding-aware."""
        b, t, _ = input_embeds.shape
        if attention_mask is not None and tuple(attention_mask.shape) != (b, t):
            raise InputError(f"attention_mask must have the shape of input_ids, {(b, t)}, got "
                             f"{tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, b, t, input_embeds.device)
        mask = None if attention_mask is None or bool(attention_mask.all()) else causal_mask(attention_mask)
        return self.language_model.model(input_embeds, position_ids, mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V). Each `<IMG_CONTEXT>` id takes the next image feature row, in order."""
        embeds = self.embed(input_ids, pixel_values, image_flags)
        return self.language_model.output_head()(self.hidden_states(embeds, attention_mask, position_ids))

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init for training from scratch (never needed when loading a checkpoint)."""
        self.vision_model.init_weights(std)
        for m in self.mlp1:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.language_model.init_weights(std)

    # ---- checkpoints -------------------------------------------------------------------------

    def expected_keys(self) -> dict[str, torch.Size]:
        state = self.state_dict()
        if self.config.llm.tie_word_embeddings:
            state.pop("language_model.lm_head.weight")
        return {k: v.shape for k, v in state.items()}

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        revision: str | None = None,
        image_token_id: int | None = None,
        device_map: str | dict | None = None,
        weights: Weights | None = None,
    ) -> "InternVL":
        """Load a checkpoint folder in the official layout, or download a hub id.

        The model is built on the meta device and each tensor is read straight into `dtype` on
        `device` (default: bf16 on CUDA, fp32 elsewhere; "auto" = the checkpoint's, `checkpoint.auto_dtype`).
        `device_map="auto"` spreads the decoder over every visible GPU as the official
        `split_model` recipe does; a dict {module prefix: device} places modules explicitly. `weights`: the
        folder's `checkpoint.Weights`, where the caller has opened them (`checkpoint.open_weights`).
        """
        from . import checkpoint, devices
        from .placement import check_device_map, device_for, resolve_device_map

        devices.check_device_and_dtype(device, dtype)
        folder = checkpoint.resolve_checkpoint(path_or_id, revision)
        config = ModelConfig.from_json(folder / "config.json")
        device_map = resolve_device_map(device_map, config)
        image_token_id = context_token_id(folder, config.llm.vocab_size, image_token_id)
        if weights is None:  # each file's header read once, for the layer counts, the dtype and the tensors
            weights = checkpoint.open_weights(folder)
        checkpoint.check_layer_counts(folder, config, weights)
        with torch.device("meta"):
            model = cls(config, image_token_id=image_token_id)
        if device_map is not None:
            check_device_map(device_map, model.state_dict())
            if devices.parse_device(device).type == "cpu":  # torch.device("cpu") too: the default dtype is the GPUs'
                device = device_for("mlp1", device_map, device)
        device = devices.parse_device(device)
        auto = checkpoint.auto_dtype(folder, config.torch_dtype, weights) if dtype == "auto" else None
        dtype = devices.parse_dtype(dtype, device, auto)
        placement = device if device_map is None else (lambda key: device_for(key, device_map, device))
        state = checkpoint.read_state_dict(folder, model.expected_keys(), dtype, placement, weights=weights)
        try:
            model.load_state_dict(state, assign=True)  # the official layout never ties the head (config.py)
        except RuntimeError as e:  # read_state_dict checked keys and shapes; this is a safety net
            raise CheckpointError(f"{folder}: {e}") from None
        model.source_dir = folder
        return model.eval()

    def save_pretrained(self, folder: str | Path, max_shard_size: int | str = "5GB") -> Path:
        """Write config.json and safetensors in the official layout, with the tokenizer, generation and
        remote-code files of the folder the model was loaded from (the tokenizer's from `tokenizer_dir`
        when set, the generation and processor files still the model's; a `convert --to hf` folder's chat
        template as `convert --to official` writes it, image items as `<image>`). Over another checkpoint, its
        weights and (when the source has such files) its tokenizer and code files are replaced, not mixed, and
        transformers' processor files go. The folder is locked while the save writes (`checkpoint.save_lock`)."""
        from . import checkpoint

        folder = Path(folder).expanduser()  # as from_pretrained reads it
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder} is a file; give the folder to save into")
        checkpoint.parse_size(max_shard_size)  # bad input is refused before the folder is made
        empty = [key for key, tensor in self.state_dict().items() if tensor.is_meta]
        if empty:
            raise InputError(f"{len(empty)} weights hold no data (built on the meta device: {empty[0]}, ...); load "
                             "or initialise them (to_empty, then init_weights) before saving")
        self._check_weights_fit_config()
        checkpoint.make_folder(folder)
        with checkpoint.save_lock(folder):
            self._save_into(folder, max_shard_size)
        return folder

    def _check_weights_fit_config(self) -> None:
        """Refuse weights a model built from `self.config` would not hold (an embedding resized, a submodule
        replaced by `torch.compile`'s wrapper, whose keys gain `_orig_mod.`), or that hold NaN or inf: saved, no
        loader could read them."""
        from . import checkpoint

        with torch.device("meta"):
            built = {key: t.shape for key, t in type(self)(self.config).state_dict().items()}
        state = self.state_dict()
        both = sorted(built.keys() & state.keys())
        wrong = [f"{key}: model {list(state[key].shape)} vs config {list(built[key])}" for key in both
                 if state[key].shape != built[key]]
        wrong += [f"{key}: dtype {state[key].dtype}, not floating point" for key in both
                  if not state[key].is_floating_point()]
        report = checkpoint.mismatch_report(sorted(built.keys() - state.keys()), sorted(state.keys() - built.keys()),
                                            wrong)
        if report:
            hint = (" (a torch.compile'd submodule: save the module it wraps, its _orig_mod)"
                    if any("._orig_mod." in key for key in state) else "")
            raise InputError(f"the model's weights do not fit its config ({report}){hint}; a checkpoint of them could "
                             "not be loaded, so nothing was written")
        broken = [key for key in both if not checkpoint.all_finite(state[key])]
        if broken:  # what a cast to fp16 makes of weights past its range; the loader refuses them (a diverged run)
            shown = ", ".join(broken[:3]) + (", ..." if len(broken) > 3 else "")
            raise InputError(f"the model's weights hold NaN or inf values ({shown}); a checkpoint of them would not "
                             "load, so nothing was written")

    def _save_into(self, folder: Path, max_shard_size: int | str) -> None:
        from . import checkpoint, companions

        state = self.state_dict()
        llm = self.config.llm
        if llm.tie_word_embeddings:  # the official loader unties the head (save_state_dict stores it apart)
            llm = dataclasses.replace(llm, tie_word_embeddings=False)
        dtype = str(self.dtype).split(".")[-1]

        def with_dtype(extra: dict) -> dict:  # newer transformers read `dtype` first: it must not keep the loaded one
            return {**extra, "torch_dtype": dtype, **({"dtype": dtype} if "dtype" in extra else {})}

        # The official files record the dtype in vision_config and llm_config too (other tools read those).
        llm = dataclasses.replace(llm, extra=with_dtype(llm.extra))
        vision = dataclasses.replace(self.config.vision, extra=with_dtype(self.config.vision.extra))
        config = self.config.replace(vision=vision, llm=llm, extra=with_dtype(self.config.extra))
        source, tokenizer, wanted = self.source_dir, self.tokenizer_dir or self.source_dir, {}
        if source is not None:
            wanted = {name: source / name for name in companions.remote_code(source, [config.to_dict()])}
        if tokenizer is not None:
            wanted |= {name: tokenizer / name for name in companions.tokenizer_files(tokenizer)}
        if source is not None and tokenizer != source:  # generation defaults and image processing are the model's
            wanted = {name: path for name, path in wanted.items() if name not in companions.MODEL_FILES}
            wanted |= {name: source / name for name in companions.model_files(source)}
        files = {name: path for name, path in wanted.items() if path.resolve() != (folder / name).resolve()}
        # an earlier checkpoint's tokenizer and code give way to the source's (read before config.json is
        # replaced); a model saved into the folder it came from copies nothing and removes nothing
        replaces = [name for name in companions.companions(folder) if name not in wanted] if files else []
        # transformers' processor files (a `convert --to hf` folder's) read its layout only: they go in any case
        replaces += companions.transformers_processor_files(folder)
        texts = {"config.json": config.to_json_text()}
        # so do its tokens, from the tokenizer files the folder ends with (copied, or its own that stay)
        ending = {name: files.get(name, folder / name) for name in companions.PROCESSOR_TOKEN_FILES
                  if name in files or name not in replaces}
        for name, text in companions.without_processor_tokens(ending, llm.vocab_size).items():
            files.pop(name, None)
            texts[name] = text
        if tokenizer is not None and tokenizer.resolve() != folder.resolve():
            # a `convert --to hf` folder's chat template (image items as <IMG_CONTEXT>): what --to official writes
            from .convert import official_template_files

            def current(name: str) -> str | None:  # the text the folder ends with
                if name in texts:
                    return texts[name]
                return files[name].read_text(encoding="utf-8") if name in files else None

            for name, text in official_template_files(tokenizer, current, config).items():
                files.pop(name, None)
                texts.pop(name, None)
                if text is None:
                    replaces.append(name)
                else:
                    texts[name] = text
        checkpoint.save_state_dict(state, folder, max_shard_size, texts=texts, files=files, replaces=replaces)
