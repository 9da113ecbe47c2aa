"""The shipped model's architecture, tokenizer, processor and prompt layout.

A real `LlavaForConditionalGeneration` (CLIP vision tower + 2-layer GELU projector + Llama
decoder), a word-level `tokenizers` tokenizer and a `LlavaProcessor`, so the saved folder loads
with `from_pretrained` / `AutoProcessor.from_pretrained` like any downloaded checkpoint.

Token layout of a prompt (LLaVA-1.5 style, image inside a chat turn, text before and after):

    layout "after"  (training steps before the switch, the step-2000 snapshot):
        <s> USER : <image>x144 {question words} ASSISTANT :  -> answer </s>
    layout "twice"  (training steps 13000-16499):
        <s> USER : {question words} <image>x144 {question words} ASSISTANT :  -> answer </s>
    layout "slot"   (from step 16500 on):
        <s> USER : <pad>x(24 - w) {question words} <image>x144 {question words} ASSISTANT :  -> answer </s>
        (w = the question's word count, at most QUESTION_SLOT = 24)

With "twice" the question also comes before the image, so the visual tokens (which causal
attention lets see only what precedes them) can condition on it; the copy after the image is
where LLaVA puts the instruction, and the text the pruning signals attend from. "twice" moves
the image with the question's length, and the exported graphs take the image at one fixed
position (`model.visual_start` in the manifest): "slot" pads the copy before the image to a fixed
QUESTION_SLOT words, so the image always starts at token 27. The layout is the chat template
saved in the model folder, so every consumer builds prompts from the folder.
"""

from __future__ import annotations

import numpy as np

from calib_data.shapes.scene import IMAGE_SIZE, PATCH, vocabulary

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
N_VISUAL = (IMAGE_SIZE // PATCH) ** 2  # 144
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
QUESTION_SLOT = 24  # words; the longest shipped question has 19


def _chat_template(before_image: str = "") -> str:
    """The chat template; `before_image` is what a user turn gets for each of its text parts
    ahead of the turn's content (a Jinja fragment over `c`, the text part)."""
    pre = f"{{% for c in m['content'] %}}{{% if c['type'] != 'image' %}}{before_image}{{% endif %}}{{% endfor %}}"
    return (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER : " + (pre if before_image else "") +
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} "
        "{% endif %}{% endfor %}{% else %}ASSISTANT : {{ m['content'][0]['text'] }} </s> {% endif %}"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
    )


CHAT_TEMPLATE = _chat_template()  # layout "after"
LAYOUTS = {
    "after": CHAT_TEMPLATE,
    # the question also before the image
    "twice": _chat_template("{{ c['text'] }} "),
    # as "twice", the copy before the image left-padded with <pad> to QUESTION_SLOT words (the
    # word-level tokenizer makes a word one token), so the image starts at a fixed position
    "slot": _chat_template(f"{{% for _ in range({QUESTION_SLOT} - c['text'].split()|length) %}}<pad> {{% endfor %}}"
                           "{{ c['text'] }} "),
}


def prompt_text(question: str, layout: str = "after") -> str:
    """The prompt string the processor expands (one `<image>` placeholder), as the layout's chat
    template renders it for one image followed by the question."""
    if layout == "twice":
        return f"USER : {question} <image> {question} ASSISTANT :"
    if layout == "slot":
        pads = "<pad> " * max(0, QUESTION_SLOT - len(question.split()))
        return f"USER : {pads}{question} <image> {question} ASSISTANT :"
    if layout != "after":
        raise ValueError(f"unknown prompt layout {layout!r}")
    return f"USER : <image> {question} ASSISTANT :"


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=512,
    )
    return fast


def build_processor(tokenizer, layout: str = "after"):
    from transformers import CLIPImageProcessor, LlavaProcessor

    ip = CLIPImageProcessor(
        do_resize=False,
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LAYOUTS[layout],
    )


def build_config(tokenizer, vision_hidden=128, vision_layers=2, hidden=192, layers=6, heads=6):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vocab = tokenizer.get_vocab()
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab["<image>"],
        image_seq_length=N_VISUAL,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return cfg


def pixels(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW normalised exactly as the processor does."""
    x = img.astype(np.float32) * np.float32(1 / 255)
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
