"""chat/template.py against an independent rendering of the published internvl2_5 rules.

The helpers `official_chat_prompt` and `official_training` below are written from the reference
notes (sections 7.1-7.3 and 9.1: the `chat()` prompt and `preprocess_internvl2_5`), and token ids
come from transformers' Qwen2Tokenizer on the same strings.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest
from tokenizer_fixture import write_qwen2_tokenizer

from internvl_mpo.chat.template import (
    IGNORE_INDEX,
    TEMPLATES,
    add_image_prefix,
    build_pair_ids,
    build_prompt_ids,
    build_training_ids,
    encode_with_images,
    expand_image_tokens,
    get_template,
    render_prompt,
)
from internvl_mpo.chat.tokenizer import load_tokenizer
from internvl_mpo.errors import ConfigError, InputError

transformers = pytest.importorskip("transformers")

SYSTEM_SHA256 = "bdb4d179c4c458dd9bd365588d3fd15aba0f2b755b4b192383416f610ad3396e"
SYS = TEMPLATES["internvl2_5"].system_message


def official_chat_prompt(question, history=None, num_patches_list=(), system=SYS, image_given=True,
                         num_image_token=256):
    """`chat()`: optional `<image>\\n` prefix, MPT rendering, in-order `<image>` replacement."""
    if history is None and image_given and "<image>" not in question:
        question = "<image>\n" + question
    messages = []
    for old_q, old_a in history or []:
        messages += [("<|im_start|>user\n", old_q), ("<|im_start|>assistant\n", old_a)]
    messages += [("<|im_start|>user\n", question), ("<|im_start|>assistant\n", None)]
    prompt = "<|im_start|>system\n" + system + "<|im_end|>\n"
    for role, message in messages:
        prompt += role + message + "<|im_end|>\n" if message else role
    for tiles in num_patches_list:
        prompt = prompt.replace("<image>", "<img>" + "<IMG_CONTEXT>" * num_image_token * tiles + "</img>", 1)
    return prompt


def official_training(hf, turns, num_patches_list, system=SYS, num_image_token=256):
    """`preprocess_internvl2_5`: per-segment tokenization, fixed 3-token header mask, last token masked."""
    segments = [("system", f"<|im_start|>system\n{system}<|im_end|>\n")]
    image = 0
    for role, content in turns:
        if role == "user":
            for _ in range(content.count("<image>")):
                tokens = "<img>" + "<IMG_CONTEXT>" * (num_image_token * num_patches_list[image]) + "</img>"
                content = content.replace("<image>", tokens, 1)
                image += 1
            segments.append(("user", f"<|im_start|>user\n{content}<|im_end|>\n"))
        else:
            segments.append(("assistant", f"<|im_start|>assistant\n{content}<|im_end|>\n"))
    ignore_len = len(hf("<|im_start|>assistant\n").input_ids)
    ids, labels = [], []
    for role, text in segments:
        seg = hf(text).input_ids
        ids += seg
        if role == "assistant":
            target = list(seg)
            target[:ignore_len] = [IGNORE_INDEX] * ignore_len
            target[-1] = IGNORE_INDEX
            labels += target
        else:
            labels += [IGNORE_INDEX] * len(seg)
    return ids, labels


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_template")
    write_qwen2_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def ours(folder):
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def hf(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_system_message_is_the_published_one():
    tmpl = get_template("internvl2_5")
    assert len(tmpl.system_message) == 58
    assert hashlib.sha256(tmpl.system_message.encode("utf-8")).hexdigest() == SYSTEM_SHA256
    assert tmpl.roles == ("<|im_start|>user\n", "<|im_start|>assistant\n") and tmpl.sep == "<|im_end|>\n"


def test_text_only_prompt_layout():
    assert render_prompt("Q") == (
        "<|im_start|>system\n" + SYS + "<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    )


FRAMES = "".join(f"Frame{k}: <image>\n" for k in range(1, 9))
CASES = {
    # name: (question, history, num_patches_list, system_message)
    "one_image": ("Describe this image in detail.", (), [3], None),
    "combined_images": ("What is shown?", (), [7], None),
    "two_images": ("Image-1: <image>\nImage-2: <image>\nWhat are the differences?", (), [2, 5], None),
    "video": (FRAMES + "What is the red panda doing?", (), [1] * 8, None),
    "multi_turn": ("And its colour?", [("<image>\nWhat is it?", "A cat."), ("Where?", "On a table.")], [2], None),
    "text_only": ("Tell me a story about 熊猫 🐼.", (), [], None),
    "text_multi_turn": ("Why?", [("Hi", "Hello! How can I help?")], [], None),
    "custom_system": ("<image>\nWhat is this?", (), [1], "You are a helpful assistant."),
    "empty_system": ("Hi", (), [], ""),
    "empty_history_answer": ("Again?", [("Hi", "")], [], None),  # the reference's bare role, no <|im_end|>
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_prompt_matches_official_rendering(name, ours, hf):
    question, history, patches, system = CASES[name]
    expected = official_chat_prompt(
        question,
        history=list(history) if history else None,
        num_patches_list=patches,
        system=SYS if system is None else system,
        image_given=bool(patches),
    )
    first = add_image_prefix(question, len(patches)) if not history else question
    rendered = expand_image_tokens(render_prompt(first, history, system), patches)
    assert rendered == expected
    ids = build_prompt_ids(ours, question, history, patches, system_message=system)
    assert ids == hf.encode(expected, add_special_tokens=False)
    assert ids.count(ours.img_context_id) == 256 * sum(patches)
    assert ids.count(ours.img_start_id) == ids.count(ours.img_end_id) == len(patches)


def test_add_image_prefix():
    assert add_image_prefix("Q", 1) == "<image>\nQ"
    assert add_image_prefix("Q", 0) == "Q"
    assert add_image_prefix("Look: <image> Q", 1) == "Look: <image> Q"
    assert add_image_prefix("Q", 2) == "Image-1: <image>\nImage-2: <image>\nQ"
    # Only the first turn gets a prefix: with history the placeholder is in the stored first question.
    prompt = render_prompt("Q2", [("<image>\nQ1", "A1")])
    assert prompt.count("<image>") == 1 and "user\nQ2" in prompt


def test_placeholder_count_mismatch(ours):
    with pytest.raises(InputError, match=r"2 <image> placeholder\(s\) but 1 image"):
        build_prompt_ids(ours, "Image-1: <image>\nImage-2: <image>\nQ", (), [3])
    with pytest.raises(InputError, match=r"1 <image> placeholder\(s\) but 2 image"):
        expand_image_tokens("<image>\nQ", [1, 1])
    with pytest.raises(InputError, match="^each image needs a positive whole number of tiles, got 0$"):
        expand_image_tokens("<image>", [0])
    # the tile counts are said where there are images; "(num_patches_list=[])" only puzzled a command-line user
    with pytest.raises(InputError, match=r"2 image\(s\) were given \(num_patches_list=\[1, 1\]\)$"):
        expand_image_tokens("<image>\nQ", [1, 1])
    with pytest.raises(InputError, match=r"^the questions hold 1 <image> placeholder\(s\) but 0 image\(s\) were "
                                         r"given$"):
        build_prompt_ids(ours, "<image>\nQ", (), [])


def test_image_placeholder_in_a_history_answer_stays_text(ours, hf):
    """Only questions place images: an answer that mentions <image> (HTML, say) is text, as in the
    official chat(), which replaces the prompt's first placeholders and so never reaches it."""
    history = [("<image>\nWhich tags does this page use?", "It uses <image> and <div>.")]
    expected = official_chat_prompt("And the second one?", history=history, num_patches_list=[2])
    assert expected.count("<img>") == 1 and "It uses <image> and <div>." in expected
    ids = build_prompt_ids(ours, "And the second one?", history, [2])
    assert ids == hf.encode(expected, add_special_tokens=False)
    # A placeholder in an answer does not stand in for one in the questions: the image is new to the
    # conversation and goes in front of the question asked with it.
    expected = ("<|im_start|>system\n" + SYS + "<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n"
                "see <image><|im_end|>\n<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 256 + "</img>\nQ2<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert build_prompt_ids(ours, "Q2", [("Q1", "see <image>")], [1]) == hf.encode(expected, add_special_tokens=False)


@pytest.mark.parametrize("question, patches, prefixed", [
    ("What is this?", [2], "<image>\nWhat is this?"),
    ("Compare them.", [1, 3], "Image-1: <image>\nImage-2: <image>\nCompare them."),
    ("Here: <image> what?", [1], "Here: <image> what?"),
])
def test_images_first_given_on_a_later_turn_go_in_front_of_that_question(ours, hf, question, patches, prefixed):
    """After text-only turns, images given with a question that has no <image> were refused (the
    official chat() prefixes only the first turn and then fails its assertion on the missing image
    tokens): they get the prefix the first turn would have given them."""
    history = [("Hi", "Hello! How can I help?")]
    expected = official_chat_prompt(prefixed, history=history, num_patches_list=patches)
    assert build_prompt_ids(ours, question, history, patches) == hf.encode(expected, add_special_tokens=False)
    # Once a question of the conversation holds the images, later questions get no prefix: the same
    # images are passed again and go to that question's placeholders, as in the official chat().
    later = [("<image>\nWhat is it?", "A cat.")] + history
    with pytest.raises(InputError, match=r"the questions hold 1 <image> placeholder\(s\) but 2 image.*; an image new "
                                         r"to the conversation needs its <image> in the question"):
        build_prompt_ids(ours, "And now?", later, [1, 1])
    # The images left out on a later turn: the error says that every turn takes them (official code
    # leaves the placeholder as text and answers without the image).
    with pytest.raises(InputError, match=r"placeholder\(s\) but 0 image\(s\) .*; pass the conversation's images "
                                         r"again with every question"):
        build_prompt_ids(ours, "And now?", later, [])


@pytest.mark.parametrize("history", [["qa"], [("q", 3)], [{"role": "user", "content": "q"}], [("q", "a", "b")],
                                     [("q", "a"), (None, "b")], [(None, None)]])
def test_history_entries_must_be_pairs_of_strings(ours, history):
    with pytest.raises(InputError, match=r"history entries must be \(question, answer\) pairs of strings"):
        build_prompt_ids(ours, "Q", history)


def test_context_length_error(ours):
    ids = build_prompt_ids(ours, "Describe.", (), [2])
    assert build_prompt_ids(ours, "Describe.", (), [2], max_length=len(ids)) == ids
    image_tokens = 2 * 256 + 2
    message = rf"prompt is {len(ids)} tokens \({image_tokens} of them image tokens\), longer than the context "
    message += f"allows: at most {len(ids) - 1}$"
    with pytest.raises(InputError, match=message):
        build_prompt_ids(ours, "Describe.", (), [2], max_length=len(ids) - 1)


SPLICE_TEXTS = [
    "<image>",
    "<image>\nQ",
    "Q<image>",
    "a<image>b",
    "  <image>  x",
    "\n<image>\n\n",
    "<|im_<image>end|>",
    "<image>\u0338 combining overlay right after the image",  # NFC would fold '>' + U+0338
    "e<image>\u0301",
    "<image><image>",
    "😀<image>😀 熊<image>猫",
    "<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.parametrize("text", SPLICE_TEXTS)
@pytest.mark.parametrize("num_image_token", [1, 256])
def test_piecewise_encoding_equals_full_encoding(ours, hf, text, num_image_token):
    patches = [(i % 3) + 1 for i in range(text.count("<image>"))]
    expanded = expand_image_tokens(text, patches, num_image_token)
    spliced = encode_with_images(ours, text, patches, num_image_token)
    assert spliced == ours.encode(expanded) == hf.encode(expanded, add_special_tokens=False)


def stripping_tokenizer(tmp_path, folder):
    """The tokenizer files of `folder` copied with `<img>` stripping the whitespace before it, `</img>` after."""
    custom = tmp_path / "strip"
    shutil.copytree(folder, custom)
    config = json.loads((custom / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = [t for t in config["additional_special_tokens"] if "img>" not in t]
    for entry in config["added_tokens_decoder"].values():
        if entry["content"] == "<img>":
            entry["lstrip"] = True
        if entry["content"] == "</img>":
            entry["rstrip"] = True
    (custom / "tokenizer_config.json").write_text(json.dumps(config))
    return custom


def test_whitespace_stripping_image_tokens_fall_back_to_full_encoding(tmp_path, folder):
    """If `<img>`/`</img>` strip whitespace, splicing would be wrong; the full string is encoded."""
    custom = stripping_tokenizer(tmp_path, folder)
    ours, hf = load_tokenizer(custom), transformers.AutoTokenizer.from_pretrained(custom)
    assert not ours.is_plain_added_token("<img>")
    text = "Look  <image>  here"
    expanded = expand_image_tokens(text, [1], 4)
    ids = encode_with_images(ours, text, [1], 4)
    assert ids == hf.encode(expanded, add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=True) == "Lookhere"


def test_image_tokens_matched_after_normalization_fall_back_to_full_encoding(tmp_path, folder):
    """Image tokens matched on the normalized text see the text around them normalized as one string (here
    stripped at its ends only): encoding the pieces apart would strip each piece; the full string is encoded."""
    from tokenizers import normalizers

    custom = stripping_tokenizer(tmp_path, folder)
    config = json.loads((custom / "tokenizer_config.json").read_text())
    for entry in config["added_tokens_decoder"].values():
        if "img>" in entry["content"]:
            entry.update(lstrip=False, rstrip=False, normalized=True)
    (custom / "tokenizer_config.json").write_text(json.dumps(config))
    backend = load_tokenizer(custom).backend
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Strip()])
    backend.save(str(custom / "tokenizer.json"))
    ours = load_tokenizer(custom)
    assert not ours.is_plain_added_token("<img>") and ours.is_plain_added_token("<IMG_CONTEXT>")
    text = "Look  <image>  here"
    expanded = expand_image_tokens(text, [1], 4)
    assert encode_with_images(ours, text, [1], 4) == ours.backend.encode(expanded, add_special_tokens=False).ids
    assert ours.decode(encode_with_images(ours, text, [1], 4)) == "Look    here"


def test_prompt_length_is_the_length_of_the_prompt_ids_and_refuses_the_same(ours, tmp_path, folder):
    """prompt_length measures a prompt from tile counts (InternVLChat checks it before tiling the images):
    it must be len(build_prompt_ids) for every prompt, where the image tokens are spliced and where a
    tokenizer whose image tokens strip whitespace encodes the whole prompt, and refuse what it refuses."""
    from internvl_mpo.chat.template import prompt_length

    stripping = load_tokenizer(stripping_tokenizer(tmp_path, folder))
    cases = [("Describe.", (), [], None), ("Describe.", (), [3], None), (" Look  <image>  here ", (), [2], "Be brief."),
             ("And this one?", [("<image>\nWhat is it?", "A <image> tag.")], [1], ""),
             ("Compare.", (), [1, 5, 2], None), ("Frame1: <image>\nFrame2: <image>\nGo", (), [1, 1], None)]
    for tokenizer in (ours, stripping):
        for question, history, patches, system in cases:
            for num_image_token in (1, 256):
                ids = build_prompt_ids(tokenizer, question, history, patches, system, num_image_token=num_image_token)
                assert prompt_length(tokenizer, question, history, patches, system, num_image_token) == len(ids)
        for question, patches, message in (("<image> and <image>", [1], "the questions hold 2 <image> placeholder"),
                                           ("Hi <IMG_CONTEXT>", [], "the text contains <IMG_CONTEXT> 1 time")):
            for measure in (build_prompt_ids, prompt_length):
                with pytest.raises(InputError, match=re.escape(message)):
                    measure(tokenizer, question, (), patches)


def _messages(*turns):
    return [{"role": role, "content": content} for role, content in turns]


TRAINING_CASES = {
    "single_image": ([("user", "<image>\nWhat is in the picture?"), ("assistant", "A red panda eating bamboo.")], [2]),
    "text_only": ([("user", "Say hi in Chinese."), ("assistant", "你好！😀")], []),
    "multi_turn": (
        [
            ("user", "Image-1: <image>\nImage-2: <image>\nCompare them."),
            ("assistant", "The first is brighter."),
            ("user", "Which one has a cat?"),
            ("assistant", "The second one, near the window."),
        ],
        [1, 3],
    ),
    "image_in_later_turn": (
        [("user", "Hello"), ("assistant", "Hi!"), ("user", "<image>\nAnd this?"), ("assistant", "A dog.")],
        [1],
    ),
    "images_in_two_turns": (
        [("user", "<image>\nWhat is it?"), ("assistant", "A cat."),
         ("user", "<image>\nAnd this?"), ("assistant", "A dog.")],
        [3, 1],
    ),
}


@pytest.mark.parametrize("name", sorted(TRAINING_CASES))
def test_training_ids_and_labels_match_official(name, ours, hf):
    turns, patches = TRAINING_CASES[name]
    ids, labels = build_training_ids(ours, _messages(*turns), patches)
    expected_ids, expected_labels = official_training(hf, turns, patches)
    assert ids == expected_ids
    assert labels == expected_labels
    # Supervised = every response followed by <|im_end|>, nothing else.
    supervised = ours.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX], skip_special_tokens=False)
    assert supervised == "".join(content + "<|im_end|>" for role, content in turns if role == "assistant")


def test_system_message_sources(ours, hf):
    turns = [("user", "Q"), ("assistant", "A")]
    custom = build_training_ids(ours, _messages(*turns), system_message="Be brief.")
    assert custom == official_training(hf, turns, [], system="Be brief.")
    in_messages = build_training_ids(ours, _messages(("system", "From data."), *turns), system_message="Be brief.")
    assert in_messages == official_training(hf, turns, [], system="From data.")


@pytest.mark.parametrize("response", ["\nThe answer is 4.", "\n\n## Heading\n- item"])
def test_leading_newline_response_keeps_first_token_supervised(ours, hf, response):
    """The reference masks 3 header tokens; here `\\n` + the response's newline(s) are one BPE token,
    so the reference hides the first response token. We supervise it; ids are unchanged."""
    turns = [("user", "Q"), ("assistant", response)]
    ids, labels = build_training_ids(ours, _messages(*turns))
    official_ids, official_labels = official_training(hf, turns, [])
    assert ids == official_ids
    differing = [i for i, (a, b) in enumerate(zip(labels, official_labels)) if a != b]
    assert len(differing) == 1
    (pos,) = differing
    assert official_labels[pos] == IGNORE_INDEX and labels[pos] == ids[pos]
    merged = ours.decode([ids[pos]], skip_special_tokens=False)
    assert merged.startswith("\n\n")  # header newline fused with the response's first newline
    assert ours.decode(ids[:pos], skip_special_tokens=False).endswith("<|im_start|>assistant")
    supervised = ours.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX], skip_special_tokens=False)
    assert supervised == "\n" + response + "<|im_end|>"


def test_pair_ids_share_the_prompt(ours, hf):
    pair = build_pair_ids(ours, "What is this?", "A cat on a mat.", "A dog.", [2])
    for answer, ids, labels in (
        ("A cat on a mat.", pair.chosen_ids, pair.chosen_labels),
        ("A dog.", pair.rejected_ids, pair.rejected_labels),
    ):
        turns = [("user", "<image>\nWhat is this?"), ("assistant", answer)]
        full_ids, full_labels = build_training_ids(ours, _messages(*turns), [2])
        assert pair.prompt_ids + ids == full_ids
        assert [IGNORE_INDEX] * len(pair.prompt_ids) + labels == full_labels
        assert (full_ids, full_labels) == official_training(hf, turns, [2])
    assert pair.prompt_ids.count(ours.img_context_id) == 512


def test_training_input_errors(ours):
    with pytest.raises(InputError, match="role"):
        build_training_ids(ours, [{"role": "bot", "content": "x"}])
    with pytest.raises(InputError, match="only come first"):
        build_training_ids(ours, _messages(("user", "Q"), ("system", "S"), ("assistant", "A")))
    with pytest.raises(InputError, match="assistant"):
        build_training_ids(ours, _messages(("user", "Q")))
    with pytest.raises(InputError, match=r"1 <image> placeholder\(s\) but 2 image"):
        build_training_ids(ours, _messages(("user", "<image>\nQ"), ("assistant", "A")), [1, 1])
    with pytest.raises(ConfigError, match="unknown conversation template"):
        render_prompt("Q", template="vicuna_v1.1")
    reserved = r"the text contains <IMG_CONTEXT> {} time\(s\); it is reserved for image features"
    with pytest.raises(InputError, match=reserved.format(2)):
        build_training_ids(ours, _messages(("user", "<image>\nQ <IMG_CONTEXT><IMG_CONTEXT>"), ("assistant", "A")), [1])
    with pytest.raises(InputError, match=reserved.format(1)):
        build_pair_ids(ours, "What is this?", "A <IMG_CONTEXT>.", "A dog.", [2])


def test_a_long_history_is_joined_without_copying_the_prompt_once_per_turn(ours, monkeypatch):
    """The prompt's text was built by adding each turn to the text so far, copying it once per turn: 80,000
    turns (a 5 MB server request) took 77 s before the length check refused them. Every `+` on the template's
    segments is counted here by the characters it builds; the prompt must not cost more than its size."""
    import dataclasses

    built = [0]

    class Counted(str):
        def __add__(self, other):
            built[0] += len(self) + len(other)
            return Counted(str.__add__(self, other))

        def __radd__(self, other):
            built[0] += len(self) + len(other)
            return Counted(str.__add__(other, self))

    class CountedTemplate(type(get_template("internvl2_5"))):
        def segments(self, messages, system_message=None):
            return [Counted(s) for s in super().segments(messages, system_message)]

    monkeypatch.setitem(TEMPLATES, "counted", CountedTemplate(**dataclasses.asdict(get_template("internvl2_5"))))
    history = [(f"question {i}", f"answer {i}") for i in range(1000)]
    ids = build_prompt_ids(ours, "last", history, template="counted")
    assert ids == build_prompt_ids(ours, "last", history)
    text = render_prompt("last", history)
    assert built[0] <= 2 * len(text)


def test_a_conversation_may_open_with_the_assistants_turn(ours, hf):
    """A first history entry (None, answer) is the assistant's opening turn alone (a chat app's greeting), as vLLM
    renders the checkpoint's chat template for [assistant, user]; an image of the question still gets its prefix."""
    system = "<|im_start|>system\n" + get_template("internvl2_5").system_message + "<|im_end|>\n"
    expected = (system + "<|im_start|>assistant\nHow can I help you?<|im_end|>\n<|im_start|>user\nDescribe a cat."
                "<|im_end|>\n<|im_start|>assistant\n")
    history = [(None, "How can I help you?")]
    assert build_prompt_ids(ours, "Describe a cat.", history) == hf.encode(expected, add_special_tokens=False)
    with_image = build_prompt_ids(ours, "Describe it.", history, [1])
    assert with_image == build_prompt_ids(ours, "<image>\nDescribe it.", history, [1])
