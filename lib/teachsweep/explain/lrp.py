"""LRP-based transformer attribution (Chefer, Gur, Wolf, CVPR 2021) for BERT-family encoders and ViT.

No hooks and no patching: `trace` re-runs the model's forward from the instance's own modules (checked to give
the model's logits), keeping every activation, and `propagate` sends relevance back with the paper's rules:
  - linear layers: alpha-beta with alpha=1, beta=0 (positive contributions x_j w_ji, normalised per output);
  - matrix products (A.V and Q.K^T): the generic rule R_X = X * d/dX[(R/Z).Z] on both operands, each halved;
  - skip connections: each branch's share rescaled in proportion to |its sum|, the two summing to the incoming;
  - LayerNorm, softmax, GELU, dropout: relevance passes unchanged.
Relevance starts as the one-hot of the target class. The attribution is the rollout of
I + mean_heads((dy/dA * R_A)^+) over layers, with R_A each attention matrix's LRP relevance (no row
normalisation, all layers: the ViT recipe, used for text too). `full_lrp` is the relevance that reaches the
input embeddings (the "LRP" baseline), `partial_lrp` the last layer's R_A."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from teachsweep.explain.relevance import readout, without_identity


def safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b with b pushed 1e-9 away from 0, and 0 where b is 0."""
    return torch.where(b == 0, torch.zeros_like(a), a / (b + 1e-9 * b.sign()))


def lrp_linear(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """alpha=1, beta=0: R_j = sum_i (x_j w_ij)^+ / sum_j' (x_j' w_ij')^+ * R_i, bias ignored."""
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    z = F.linear(x_pos, w_pos) + F.linear(x_neg, w_neg)
    s = safe_div(relevance, z)
    return x_pos * (s @ w_pos) + x_neg * (s @ w_neg)


def lrp_matmul(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generic rule on Z = a @ b for both operands, each half."""
    s = safe_div(relevance, a @ b)
    return a * (s @ b.transpose(-1, -2)) / 2, b * (a.transpose(-1, -2) @ s) / 2


def lrp_add(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Skip connection: z-rule shares, rescaled per sample so their totals are proportional to |total| and sum
    to the incoming relevance."""
    s = safe_div(relevance, a + b)
    r_a, r_b = a * s, b * s
    dims = tuple(range(1, relevance.dim()))
    sum_a, sum_b, total = r_a.sum(dims, keepdim=True), r_b.sum(dims, keepdim=True), relevance.sum(dims, keepdim=True)
    share_a = safe_div(sum_a.abs(), sum_a.abs() + sum_b.abs()) * total
    share_b = safe_div(sum_b.abs(), sum_a.abs() + sum_b.abs()) * total
    return r_a * safe_div(share_a, sum_a), r_b * safe_div(share_b, sum_b)


@dataclass
class Layer:
    pre_norm: bool  # ViT: LayerNorm before each block; BERT: after each residual sum
    attn_in: torch.Tensor  # input of the Q/K/V projections (x, or LayerNorm(x))
    q: torch.Tensor  # (B, H, n, dh), already scaled by 1/sqrt(dh)
    k: torch.Tensor
    v: torch.Tensor
    attention: torch.Tensor  # (B, H, n, n), part of the autograd graph
    context: torch.Tensor  # (B, n, d)
    attn_out: torch.Tensor  # context @ Wo (+ b)
    residual1: torch.Tensor  # the skip input of the first sum (x)
    ffn_in: torch.Tensor  # input of the first MLP layer
    ffn_hidden: torch.Tensor  # after the activation
    ffn_out: torch.Tensor
    residual2: torch.Tensor  # the skip input of the second sum
    modules: dict


def _parts(model):
    """Per-instance modules of a BERT-family TextClassifier or an HF ViT ImageClassifier."""
    if hasattr(model, "encoder"):
        bert = model.encoder
        blocks = [
            dict(
                q=b.attention.self.query,
                k=b.attention.self.key,
                v=b.attention.self.value,
                o=b.attention.output.dense,
                ln1=b.attention.output.LayerNorm,
                fc1=b.intermediate.dense,
                fc2=b.output.dense,
                ln2=b.output.LayerNorm,
                act=b.intermediate.intermediate_act_fn,
            )
            for b in bert.encoder.layer
        ]
        return "bert", bert.config, blocks
    vit = model.net.vit
    blocks = [
        dict(
            q=b.attention.q_proj,
            k=b.attention.k_proj,
            v=b.attention.v_proj,
            o=b.attention.o_proj,
            ln1=b.layernorm_before,
            fc1=b.mlp.fc1,
            fc2=b.mlp.fc2,
            ln2=b.layernorm_after,
            act=b.mlp.activation_fn,
        )
        for b in vit.layers
    ]
    return "vit", vit.config, blocks


def trace(model, batch: dict):
    """Re-run the forward from the model's modules, keeping what the rules need: (logits, layers, head input)."""
    kind, config, blocks = _parts(model)
    heads = config.num_attention_heads
    if kind == "bert":
        x = model.encoder.embeddings(input_ids=batch["input_ids"])
        mask = batch["attention_mask"]
    else:
        x = model.net.vit.embeddings(batch["pixel_values"])
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
    x = x.detach().requires_grad_(True)  # a graph for dy/dA even when every parameter is frozen
    bias = (1 - mask)[:, None, None, :].to(x.dtype) * torch.finfo(x.dtype).min
    batch_size, n, d = x.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch_size, n, heads, d // heads).transpose(1, 2)

    layers = []
    for m in blocks:
        attn_in = m["ln1"](x) if kind == "vit" else x
        q = split(m["q"](attn_in)) * (d // heads) ** -0.5
        k, v = split(m["k"](attn_in)), split(m["v"](attn_in))
        attention = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
        context = (attention @ v).transpose(1, 2).reshape(batch_size, n, d)
        attn_out = m["o"](context)
        x1 = attn_out + x if kind == "vit" else m["ln1"](attn_out + x)
        ffn_in = m["ln2"](x1) if kind == "vit" else x1
        ffn_hidden = m["act"](m["fc1"](ffn_in))
        ffn_out = m["fc2"](ffn_hidden)
        x2 = ffn_out + x1 if kind == "vit" else m["ln2"](ffn_out + x1)
        layers.append(
            Layer(kind == "vit", attn_in, q, k, v, attention, context, attn_out, x, ffn_in, ffn_hidden, ffn_out, x1, m)
        )
        x = x2
    if kind == "bert":
        pooled = model.pool(x, mask)
        logits = model.head(pooled)
        head = ("bert", x, pooled, model.head.weight, mask, model.pooling)
    else:
        final = model.net.vit.layernorm(x)
        logits = model.net.classifier(final[:, 0])
        head = ("vit", final, final[:, 0], model.net.classifier.weight, mask, "cls")
    return logits, layers, head


def propagate(model, batch: dict, target: torch.Tensor | None = None):
    """(target, layers, relevance of each attention matrix, relevance at each layer's input and output,
    relevance of the input embeddings)."""
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        logits, layers, (kind, hidden, pooled, head_weight, mask, pooling) = trace(model, batch)
        target = logits.argmax(-1) if target is None else target.to(logits.device)
        grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), [layer.attention for layer in layers])
    model.train(was_training)
    with torch.no_grad():
        relevance_logits = F.one_hot(target, logits.shape[-1]).to(pooled.dtype)
        relevance_pooled = lrp_linear(pooled.detach(), head_weight, relevance_logits)
        relevance = torch.zeros_like(hidden)
        if pooling == "mean":
            weights = (mask.to(hidden.dtype) / mask.sum(-1, keepdim=True).to(hidden.dtype))[:, :, None]
            contribution = weights * hidden.detach()
            relevance = contribution * safe_div(relevance_pooled, contribution.sum(1))[:, None, :]
        else:
            relevance[:, 0] = relevance_pooled
        attention_relevance, totals = [], []
        for layer in reversed(layers):
            out_total = relevance.sum(dim=(1, 2))
            relevance, r_attention = propagate_layer(layer, relevance)
            attention_relevance.insert(0, r_attention)
            totals.insert(0, (relevance.sum(dim=(1, 2)), out_total))
    return target, layers, [g.detach() for g in grads], attention_relevance, totals, relevance, mask


def propagate_layer(layer: Layer, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance at a block's output -> (relevance at its input, relevance of its attention matrix)."""
    d = {k: v.detach() for k, v in vars(layer).items() if isinstance(v, torch.Tensor)}
    m = layer.modules
    # second residual sum (LayerNorm passes relevance unchanged)
    r_ffn, r_x1 = lrp_add(d["ffn_out"], d["residual2"], relevance)
    r_hidden = lrp_linear(d["ffn_hidden"], m["fc2"].weight, r_ffn)  # the activation passes it unchanged
    r_x1 = r_x1 + lrp_linear(d["ffn_in"], m["fc1"].weight, r_hidden)
    # first residual sum
    r_attn_out, r_x = lrp_add(d["attn_out"], d["residual1"], r_x1)
    r_context = lrp_linear(d["context"], m["o"].weight, r_attn_out)
    batch_size, heads, n, dh = d["v"].shape
    r_context = r_context.view(batch_size, n, heads, dh).transpose(1, 2)
    r_attention, r_v = lrp_matmul(d["attention"], d["v"], r_context)
    r_q, r_kt = lrp_matmul(d["q"], d["k"].transpose(-1, -2), r_attention)  # softmax passes it unchanged
    merge = lambda t: t.transpose(1, 2).reshape(batch_size, n, heads * dh)  # noqa: E731
    r_in = sum(
        lrp_linear(d["attn_in"], m[name].weight, merge(r))
        for name, r in (("q", r_q), ("k", r_kt.transpose(-1, -2)), ("v", r_v))
    )
    return r_x + r_in, r_attention


def lrp_attribution(model, batch: dict, target: torch.Tensor | None = None) -> torch.Tensor:
    """Chefer et al. CVPR 2021: rollout of I + mean_heads((dy/dA * R_A)^+) over all layers; read out R - I."""
    _, layers, grads, attention_relevance, _, _, mask = propagate(model, batch, target)
    batch_size, _, n, _ = layers[0].attention.shape
    eye = torch.eye(n, device=mask.device)
    result = eye.expand(batch_size, n, n).clone()
    for grad, r_attention in zip(grads, attention_relevance, strict=True):
        result = torch.bmm(eye + (grad * r_attention).clamp(min=0).mean(dim=1), result)
    return readout(without_identity(result), mask, model, batch)


def partial_lrp(model, batch: dict, target: torch.Tensor | None = None) -> torch.Tensor:
    """The last layer's attention relevance, head mean."""
    _, _, _, attention_relevance, _, _, mask = propagate(model, batch, target)
    return readout(attention_relevance[-1].clamp(min=0).mean(dim=1), mask, model, batch)


def full_lrp(model, batch: dict, target: torch.Tensor | None = None) -> torch.Tensor:
    """Relevance of the input embeddings, summed over the hidden dimension (positive part)."""
    _, _, _, _, _, relevance, mask = propagate(model, batch, target)
    return relevance.sum(-1).clamp(min=0) * model.explained_tokens(batch).to(relevance.dtype)
