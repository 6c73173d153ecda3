"""Tiny vision-language models, processors and an image+text dataset built locally for the tests (no Hub access).

Two families, each a teacher and a smaller student sharing one processor:

- `"qwen2_vl"`: `Qwen2VLForConditionalGeneration` (M-RoPE, `pixel_values` as flattened patches + `image_grid_thw`,
  `mm_token_type_ids`), `Qwen2VLProcessor` with the slow PIL image processor.
- `"gemma3"`: `Gemma3ForConditionalGeneration` (SigLIP tower, `pixel_values` `[N, 3, H, W]`, `token_type_ids` for the
  bidirectional image attention), `Gemma3Processor` with the slow PIL image processor.

Pitfalls handled here:

- transformers' fast image processors and every video processor need torchvision, which is not installed: the slow
  `*ImageProcessorPil` classes are used, and Qwen2-VL's processor is subclassed without its video processor (the stock
  class refuses to be built without one: its class check imports the torchvision-backed video processor mapping).
- The placeholder tokens (`<|vision_start|>`, `<|image_pad|>`, `<start_of_image>`, ...) are registered as added special
  tokens so the processor's expanded runs of `<|image_pad|><|image_pad|>...` split into one token each.
- Gemma-3's multimodal projector is zero-initialised by transformers (images would have no effect): it is re-drawn.
- Image placeholders are labelled by TRL's vision collator (labels = input_ids except padding), so they are scored.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterable  # noqa: E402

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from tiny import WORDS  # noqa: E402
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    SiglipVisionConfig,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

VLM_FAMILIES = ("qwen2_vl", "gemma3")

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}
SHAPES = ("circle", "square")
EXTRA_WORDS = ("green", "yellow", "circle", "square", "this", "color", "shape", "image", "describe", "model")

# Sizes of the images the dataset draws (width, height): two aspect ratios, so Qwen2-VL gets different numbers of image
# tokens within a batch (56x56 -> 4 tokens, 84x56 -> 28x56 after resizing -> 2 tokens); Gemma-3 resizes all to 28x28
IMAGE_SIZES = ((56, 56), (84, 56))

_QWEN_SPECIALS = (
    "<pad>",
    "<s>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_GEMMA_SPECIALS = (
    "<pad>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)


def _chat_template(bos: str, turn_start: str, turn_end: str, image: str, assistant_role: str) -> str:
    """A chat template over plain or structured content; `{% generation %}` marks the assistant turns."""
    return (
        "{%- macro render(content) -%}"
        "{%- if content is string -%}{{ content + ' ' }}{%- else -%}{%- for block in content -%}"
        f"{{%- if block['type'] == 'image' -%}}{{{{ '{image} ' }}}}"
        "{%- elif block['type'] == 'text' -%}{{ block['text'] + ' ' }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
        f"{{{{ '{bos}' }}}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        f"{{{{ '{turn_start} {assistant_role} ' }}}}"
        f"{{% generation %}}{{{{ render(message['content']) + '{turn_end} ' }}}}{{% endgeneration %}}"
        "{%- else -%}"
        f"{{{{ '{turn_start} ' + message['role'] + ' ' + render(message['content']) + '{turn_end} ' }}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ '{turn_start} {assistant_role} ' }}}}{{%- endif -%}}"
    )


# TRL's vision collator turns every message content into a list of {"type": "image"} / {"type": "text"} blocks
QWEN2_VL_CHAT_TEMPLATE = _chat_template(
    "", "<|im_start|>", "<|im_end|>", "<|vision_start|><|image_pad|><|vision_end|>", "assistant"
)
GEMMA3_CHAT_TEMPLATE = _chat_template("<bos> ", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "model")


class TinyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without a video processor: transformers' video processors need torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )


def _word_level_tokenizer(specials: tuple[str, ...], **kwargs) -> PreTrainedTokenizerFast:
    tokens = list(dict.fromkeys([*specials, *WORDS, *EXTRA_WORDS]))  # no duplicates: ids stay contiguous
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Added tokens are matched before pre-tokenization: "<|image_pad|><|image_pad|>" splits into two tokens
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **kwargs)


def make_vlm_processor(family: str):
    """The processor shared by a family's teacher and student (slow PIL image processor, local tokenizer)."""
    if family == "qwen2_vl":
        tokenizer = _word_level_tokenizer(_QWEN_SPECIALS, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>")
        tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
        # Every image is resized to at most 56*56 pixels: 14x14 patches, 2x2 merged -> at most 4 image tokens
        image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)
        return TinyQwen2VLProcessor(image_processor, tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    if family == "gemma3":
        tokenizer = _word_level_tokenizer(
            _GEMMA_SPECIALS,
            pad_token="<pad>",
            bos_token="<bos>",
            eos_token="<end_of_turn>",
            extra_special_tokens={
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>",
            },
        )
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
        # 28x28 images, 7x7 patches (4x4 grid) pooled to 2x2 = 4 image tokens
        image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})
        return Gemma3Processor(image_processor, tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=4)
    raise ValueError(f"Unknown VLM family {family!r}; expected one of {VLM_FAMILIES}.")


def make_vlm_model(
    family: str,
    processor,
    hidden_size: int = 32,
    num_layers: int = 1,
    vision_dim: int = 16,
    vision_layers: int = 1,
    seed: int = 0,
):
    """A randomly initialised tiny VLM of `family` whose vocabulary and image layout match `processor`."""
    tokenizer = processor.tokenizer
    vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    heads = 4
    head_dim = hidden_size // heads
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if family == "qwen2_vl":
        half = head_dim // 2  # M-RoPE sections (temporal, height, width) split the rotary half of each head
        mrope_section = [half - 2 * (half // 3), half // 3, half // 3]
        config = Qwen2VLConfig(
            text_config=dict(
                **text,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            ),
            vision_config=dict(
                depth=vision_layers,
                embed_dim=vision_dim,
                hidden_size=hidden_size,  # the patch merger projects to the text width
                num_heads=2,
                mlp_ratio=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        )
        model = Qwen2VLForConditionalGeneration(config)
    elif family == "gemma3":
        config = Gemma3Config(
            text_config=Gemma3TextConfig(
                **text,
                head_dim=head_dim,
                query_pre_attn_scalar=head_dim,
                sliding_window=16,
                layer_types=(["sliding_attention", "full_attention"] * num_layers)[:num_layers],
            ),
            vision_config=SiglipVisionConfig(
                hidden_size=vision_dim,
                intermediate_size=2 * vision_dim,
                num_hidden_layers=vision_layers,
                num_attention_heads=2,
                image_size=28,
                patch_size=7,
            ),
            mm_tokens_per_image=4,
            boi_token_index=tokenizer.boi_token_id,
            eoi_token_index=tokenizer.eoi_token_id,
            image_token_index=tokenizer.image_token_id,
        )
        model = Gemma3ForConditionalGeneration(config)
        with torch.no_grad():  # transformers initialises it to zeros: images would change nothing
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, vision_dim**-0.5)
    else:
        raise ValueError(f"Unknown VLM family {family!r}; expected one of {VLM_FAMILIES}.")
    return model


def make_vlm_pair(family: str, seed: int = 0):
    """`(teacher, student, processor)`: a peaky 2-layer teacher and a smaller 1-layer student of `family`."""
    processor = make_vlm_processor(family)
    teacher = make_vlm_model(family, processor, 64, num_layers=2, vision_dim=32, vision_layers=2, seed=seed + 7)
    with torch.no_grad():  # sharper next-token distributions (tied for Gemma-3: the input embedding too)
        teacher.get_output_embeddings().weight.mul_(6.0)
    student = make_vlm_model(family, processor, 32, num_layers=1, vision_dim=16, vision_layers=1, seed=seed)
    return teacher, student, processor


def make_text_model(processor, hidden_size: int = 32, num_layers: int = 1, seed: int = 0) -> Qwen2ForCausalLM:
    """A text-only tiny causal LM sharing `processor`'s tokenizer (same vocabulary)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen2ForCausalLM(config)


def vision_tower(model):
    """The vision encoder of a tiny VLM (also through a PEFT wrapper)."""
    inner = model.get_base_model() if hasattr(model, "peft_config") else model
    return inner.model.visual if hasattr(inner.model, "visual") else inner.model.vision_tower


def draw_image(color: str, shape: str, size: tuple[int, int] = (56, 56), background: tuple | None = None):
    """A PIL image: a `color` `shape` (circle or square) on a plain background."""
    background = background or (245, 245, 245)
    image = Image.new("RGB", size, background)
    w, h = size
    box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    return image


def vlm_dataset(n: int = 8, seed: int = 0, text_only: bool = False) -> Dataset:
    """Conversational image+text dataset: columns `images` (one PIL image each) and `messages`.

    The assistant names the image's colour and shape, so the answer depends on the image. With `text_only=True` the
    `images` column is left out (the same conversations as a plain conversational dataset).
    """
    g = torch.Generator().manual_seed(seed)
    colors = list(COLORS)
    images, messages = [], []
    for i in range(n):
        color = colors[int(torch.randint(len(colors), (1,), generator=g))]
        shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))]
        background = tuple(int(c) for c in torch.randint(200, 256, (3,), generator=g))
        images.append([draw_image(color, shape, IMAGE_SIZES[i % len(IMAGE_SIZES)], background)])
        question = "what is this" if i % 2 == 0 else "describe the image"
        messages.append(
            [
                {"role": "user", "content": question},
                {"role": "assistant", "content": f"a {color} {shape}"},
            ]
        )
    if text_only:
        return Dataset.from_dict({"messages": messages})
    return Dataset.from_dict({"images": images, "messages": messages})


def image_token_ids(processor) -> list[int]:
    """Ids of the image placeholder tokens of `processor`'s model family (start/pad/end markers)."""
    tokenizer = processor.tokenizer
    names = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<start_of_image>", "<image_soft_token>")
    names += ("<end_of_image>",)
    vocab = tokenizer.get_vocab()
    return [vocab[name] for name in names if name in vocab]


def naive_vlm_distill_loss(
    student,
    teacher,
    batch: dict,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    ignore_token_ids: Iterable[int] = (),
) -> torch.Tensor:
    """Full-logit reference: forward KL(teacher || student) at `temperature`, times `temperature**2`, per scored token.

    Both models run their normal forward on the whole batch (images included, labels left out, `use_cache=False`) and
    return full `[B, L, V]` logits; position `i` predicts `labels[:, i + 1]`, and tokens labelled -100 (or whose label
    is in `ignore_token_ids`) are not scored. Computed in float64 over the first `vocab_size` logits (all by default).
    The student's graph is kept (the result can be backpropagated); the teacher runs without gradients.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"} | {"use_cache": False}
    s_logits = student(**inputs).logits[:, :-1].double()
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[:, :-1].double()
    labels = batch["labels"][:, 1:].to(s_logits.device)
    mask = labels != -100
    for token_id in ignore_token_ids:
        mask &= labels != token_id
    v = vocab_size or min(s_logits.shape[-1], t_logits.shape[-1])
    log_ps = torch.log_softmax(s_logits[..., :v] / temperature, -1)[mask]
    log_pt = torch.log_softmax(t_logits[..., :v].to(s_logits.device) / temperature, -1)[mask]
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return temperature**2 * kl.sum() / mask.sum()
