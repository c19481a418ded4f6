"""The GPU checklist of docs/gpu.md as one script, for a machine with a CUDA device: each check runs the
real job on CUDA without Ray or MLflow, prints what it measured, and a failure is printed and does not stop the
others. Each check imports the jobs and libraries it runs (torch, transformers, the benches) when it starts, so
that one failing to import fails that check alone. Needs the package's job dependencies (not ray, optuna or
mlflow) and its offline data packages.

    PYTHONPATH=lib python scripts/gpu_check.py [device lot lstm rl scaffold mfu bench_lot bench_rl]
"""

from __future__ import annotations

import argparse
import math
import time
import traceback

import torch

# rotten_tomatoes as the text checks read it (the MiniLM shapes with random weights: random_minilm)
TEXT_ON_CUDA = {"task": "rotten_tomatoes", "max_length": 64, "max_eval_examples": 300, "device": "cuda"}


def check(name: str):
    def wrap(fn):
        def run(*args):
            start = time.perf_counter()
            print(f"\n=== {name}", flush=True)
            try:
                fn(*args)
                print(f"--- ok ({time.perf_counter() - start:.1f} s)", flush=True)
            except Exception:  # noqa: BLE001 (a report: every check runs)
                traceback.print_exc()
                print(f"--- FAILED ({time.perf_counter() - start:.1f} s)", flush=True)

        return run

    return wrap


@check("device and precision")
def device_and_precision() -> None:
    from teachsweep.training import native_bf16, uses_bf16

    device = torch.device("cuda")
    capability = torch.cuda.get_device_capability(device)
    print(
        f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}, capability {capability}, "
        f"native bf16 {native_bf16(capability)}, precision auto uses bf16: {uses_bf16(device, 'auto')}"
    )
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    print(f"bf16 8192^3 matmul: {10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12:.0f} TFLOP/s")


@check("LoT on digits (cnn:8), CUDA, precision auto (bf16) and fp32")
def lot_digits() -> None:
    from teachsweep.jobs import lot

    job = lot.DIGITS_QUICK | {"steps_per_epoch": 30, "batch_size": 32, "max_eval_examples": 200, "device": "cuda"}
    for precision in ("auto", "fp32"):
        m = lot.train(job | {"precision": precision})
        print(
            f"{precision}: teacher val acc {m['teacher/val_acc']:.3f}, student {m['student/val_acc']:.3f}, "
            f"{m['time/teacher_step_s'] * 1e3:.1f} ms / teacher step"
        )
        assert math.isfinite(m["loss/teacher"]) and m["teacher/val_acc"] > 0.3


@check("LoT on rotten_tomatoes (minilm:2 shapes, SDPA), CUDA, bf16 and fp32")
def lot_text() -> None:
    from teachsweep.jobs import lot

    random_minilm()
    job = TEXT_ON_CUDA | {"teacher": "minilm:2", "epochs": 1, "steps_per_epoch": 40, "lr": 3e-4, "batch_size": 32}
    for precision in ("fp32", "auto", "fp32", "auto"):  # twice each: the first run of a kind pays CUDA's warm-up
        m = lot.train(job | {"precision": precision})
        print(
            f"{precision}: teacher val acc {m['teacher/val_acc']:.3f}, "
            f"{m['time/teacher_step_s'] * 1e3:.1f} ms / teacher step"
        )
        assert math.isfinite(m["loss/teacher"])


@check("LoT LSTM language model under bf16 autocast: the recurrent cell stays fp32")
def lot_lstm() -> None:
    from teachsweep.jobs import lot

    job = {
        "task": "bbc_news_lm_2k",
        "teacher": "lstm:1",
        "epochs": 2,
        "steps_per_epoch": 40,
        "max_train_examples": 30000,
        "max_eval_examples": 5000,
        "optimizer": "sgd",
        "lr": 20.0,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "clip_grad_norm": 0.25,
        "batch_size": 20,
        "bptt": 35,
        "alpha": 1.0,
        "student_steps": 5,
        "device": "cuda",
        "precision": "bf16",
    }
    reporter_history = []
    from teachsweep.reporter import Reporter

    reporter = Reporter()
    m = lot.train(job, reporter)
    reporter_history = [h["teacher/val_ppl"] for h in reporter.history]
    print(
        f"val perplexity per epoch {[round(p, 1) for p in reporter_history]}, "
        f"{m['time/teacher_step_s'] * 1e3:.1f} ms / teacher step"
    )
    assert reporter_history[-1] < reporter_history[0] and math.isfinite(m["loss/teacher"])


@check("LoT for RL (CartPole) on CUDA learns")
def lot_rl_cuda() -> None:
    from teachsweep.jobs import lot_rl

    config = lot_rl.CARTPOLE_QUICK | {"arm": "lot", "device": "cuda", "buffer_rollouts": 4}
    m = lot_rl.train(config)
    print(
        f"best greedy return {m['teacher/best_eval_return']:.0f}, student {m['student/eval_return']:.0f}, "
        f"agreement {m['agreement/buffer']:.3f}, {m['time/env_steps_per_s']:.0f} env steps/s"
    )
    assert m["teacher/best_eval_return"] >= 200


@check("bench rl on the CPU and on CUDA")
def bench_rl() -> None:
    from rich.console import Console

    from teachsweep.benchmarks.rl import rl_cost

    for device in ("cpu", "cuda"):
        rl_cost(20, 3, "gym:CartPole-v1", Console(width=140), device)


@check("bench lot on CUDA (resnet:8, mnist_5k)")
def bench_lot() -> None:
    from rich.console import Console

    from teachsweep.benchmarks.lot import lot_cost

    lot_cost(30, 3, "resnet:8", Console(width=140), "cuda")


@check("bench scaffold on CUDA (minilm:2 shapes): a SMaT iteration over a plain student step")
def bench_scaffold() -> None:
    from rich.console import Console

    from teachsweep.benchmarks.scaffold import scaffold_cost

    random_minilm()
    scaffold_cost(20, "minilm:2", Console(width=140), "cuda")


def random_minilm(layers: int = 6) -> None:
    """The MiniLM package's directory with randomly initialised weights of MiniLM's shapes (its 90 MB of weights do
    not travel to the device machine): enough for every code path and for FLOP utilisation, not for accuracy."""
    from transformers import BertConfig, BertModel

    from teachsweep import models

    directory = models.minilm_dir()
    if not (directory / "model.safetensors").exists():
        config = BertConfig.from_pretrained(str(directory))
        BertModel(config).save_pretrained(str(directory))


@check("teacher + SMaT on rotten_tomatoes (minilm:2, random weights), CUDA, bf16")
def scaffold_cuda() -> None:
    from teachsweep.jobs import scaffold

    random_minilm()
    teacher = TEXT_ON_CUDA | {"model": "minilm:2", "lr": 1e-4, "epochs": 1, "steps_per_epoch": 50}
    for explainer in ("attention", "smat"):
        start = time.perf_counter()
        m = scaffold.train(
            {
                "teacher": teacher,
                "explainer": explainer,
                "num_train_examples": 500,
                "max_epochs": 2,
                "max_length": 64,
                "max_eval_examples": 300,
                "device": "cuda",
            }
        )
        print(
            f"{explainer}: test simulability {m['simulability/test']:.3f} "
            f"({time.perf_counter() - start:.1f} s for 2 epochs)"
        )


@check("model FLOP utilisation of a BERT-size classifier step (bf16), by batch size")
def flop_utilisation() -> None:
    from teachsweep import models, tasks
    from teachsweep.benchmarks.measure import matmul_flops

    random_minilm()
    device = torch.device("cuda")
    task = tasks.load_task("rotten_tomatoes")
    model = models.build_model("minilm", task, seed=0).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    peak = 989e12  # H100 SXM dense bf16
    from transformers import PreTrainedModel

    for implementation, (batch_size, length) in [
        (i, shape) for i in (models.EXPLAINABLE_ATTENTION, "sdpa") for shape in ((32, 64), (256, 128), (512, 256))
    ]:
        for module in model.modules():  # what a job that never reads attention could use
            if isinstance(module, PreTrainedModel):
                module.set_attn_implementation(implementation)
        batch = {
            "input_ids": torch.randint(1000, 20000, (batch_size, length), device=device),
            "attention_mask": torch.ones(batch_size, length, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (batch_size,), device=device),
        }

        def step(batch=batch):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits, _ = model(batch)
                loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        flops = matmul_flops(step)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / 10
        rate = flops / seconds
        print(
            f"{implementation}, batch {batch_size} x {length}: {seconds * 1e3:.2f} ms / step, {rate / 1e12:.1f} "
            f"TFLOP/s = {rate / peak:.1%} of 989 TFLOP/s (matmul FLOPs)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    checks = {
        "device": device_and_precision,
        "lot": lot_digits,
        "lot_text": lot_text,
        "lstm": lot_lstm,
        "rl": lot_rl_cuda,
        "scaffold": scaffold_cuda,
        "mfu": flop_utilisation,
        "bench_lot": bench_lot,
        "bench_rl": bench_rl,
        "bench_scaffold": bench_scaffold,
    }
    parser.add_argument("checks", nargs="*", help=f"the checks to run, of {', '.join(checks)} (default: all)")
    args = parser.parse_args()
    for name in args.checks or checks:
        checks[name]()


if __name__ == "__main__":
    main()
