"""`teachsweep bench relevance`: relevance explanations per second, batched against one example at a time, with
the matmul GFLOP/s each way reaches against the machine's peak."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from rich.console import Console
from rich.table import Table

from teachsweep import data, models, tasks
from teachsweep.benchmarks.measure import matmul_flops, matmul_peak_gflops, peak_memory, seconds
from teachsweep.explain import lrp, relevance
from teachsweep.training import pick_device, to_device


def relevance_throughput(
    examples: int, batch_size: int, model_names: list[str], console: Console, device_name: str = "cpu"
) -> None:
    """Explanations per second of the batched relevance explainers versus a loop over single examples (the
    reference code's way), same model, same inputs, one run: text models on rotten_tomatoes test sentences,
    image models on mnist_5k test digits (weights as initialised: the cost does not depend on them).

    Beside the speed-up, the matmul GFLOP/s each way reaches and this machine's float32 matmul peak: the loop's
    FLOPs are the useful work, so peak / (loop GFLOP/s) bounds what any batching can gain here. FLOPs are counted
    first, one batch per profile (see run_flops), so memory stays at one batch's worth whatever `examples` is, and
    before the warm-up, so no timed run follows a profile. On a GPU (`device_name`), every timing waits for the
    queued kernels, and the peak is the device's."""
    device = pick_device(device_name)
    peak = matmul_peak_gflops(device=device)
    explainers = {name: relevance.EXPLAINERS[name] for name in ("relevance", "rollout", "attention_gradcam")}
    explainers["lrp"] = lrp.lrp_attribution
    for model_name in model_names:
        kind = "image" if models.parse_name(model_name)[0] in models.IMAGE_MODELS else "text"
        task = tasks.load_task("mnist_5k" if kind == "image" else "rotten_tomatoes")
        model = models.build_model(model_name, task, seed=0).eval().to(device)
        tokenizer = models.load_tokenizer(model_name) if kind == "text" else None
        batches = data.make_batches(task, "test", tokenizer, 64, examples)
        inputs = [to_device(batch, device) for batch in data.eval_batches(batches, batch_size, by_length=True)]
        where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
        table = Table(title=f"bench relevance: {model_name}, {examples} {task.name} test examples, {where}")
        for column in (
            "explainer",
            f"batched ({batch_size}) expl/s",
            "single-example loop expl/s",
            "speed-up",
            "GFLOP/s batched / loop",
            "ceiling here",
        ):
            table.add_column(column)
        flops = {
            name: [run_flops(explainer, model, inputs, one_by_one) for one_by_one in (0, 1)]
            for name, explainer in explainers.items()
        }
        for one_by_one in (0, 1):  # every input shape once before any timing, so no arm pays first-use costs
            explain_all(relevance.generic_rule, model, inputs, one_by_one)
        rows = []
        for name, explainer in explainers.items():
            batched, single = (partial(explain_all, explainer, model, inputs, one_by_one) for one_by_one in (0, 1))
            batched_s, single_s = seconds(batched, device), seconds(single, device)
            rows.append((name, batched_s, single_s, flops[name][0] / batched_s / 1e9, flops[name][1] / single_s / 1e9))
        # a peak read in a slow moment of a shared machine must not fall below what the explainers reached
        peak = max(peak, *(row[3] for row in rows))
        for name, batched_s, single_s, batched_rate, single_rate in rows:
            table.add_row(
                name,
                f"{examples / batched_s:.1f}",
                f"{examples / single_s:.1f}",
                f"{single_s / batched_s:.1f}x",
                f"{batched_rate:.1f} / {single_rate:.1f}",
                f"{peak / single_rate:.1f}x",
            )
        table.caption = f"float32 matmul peak {peak:.0f} GFLOP/s"
        console.print(table)
        console.print(peak_memory(), f"(after {model_name})")
        del model, batches, inputs  # before the next model is built
    console.print(
        "ceiling here: the speed-up batching would reach if it ran the loop's FLOPs at the matmul peak "
        "(target for the generic rule: >= 8x)"
    )


def explain_all(explainer: Callable, model: torch.nn.Module, inputs: list[dict], one_by_one: bool) -> None:
    for batch in inputs:
        relevance.single_example_loop(explainer, model, batch) if one_by_one else explainer(model, batch)


def run_flops(explainer: Callable, model: torch.nn.Module, inputs: list[dict], one_by_one: bool) -> float:
    """The matmul FLOPs of explain_all(explainer, model, inputs, one_by_one), counted one batch per profile (a
    profile with FLOPs records shapes, and so holds every tensor the profiled work made until it stops: one
    profile over all the inputs held every example's activations at once, tens of GB at the default 256
    examples) and once per distinct input (the same shapes and real lengths run the same matmuls: every image
    batch of a size is profiled once)."""
    counted: dict[tuple, float] = {}
    total = 0.0
    for batch in inputs:
        mask = batch.get("attention_mask")
        key = (
            tuple((name, tuple(value.shape)) for name, value in batch.items()),
            None if mask is None else tuple(mask.sum(-1).tolist()),
        )
        if key not in counted:
            counted[key] = matmul_flops(partial(explain_all, explainer, model, [batch], one_by_one))
        total += counted[key]
    return total
