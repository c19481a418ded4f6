"""GPU readiness without a GPU: device choice, bf16 choice, GPU requests in specs."""

import re

import pytest
import torch
from transformers import PreTrainedModel

from teachsweep import models, tasks
from teachsweep.spec import SpecError, parse_spec
from teachsweep.training import native_bf16, uses_bf16
from teachsweep.trial import device_for

SPEC = """
name: g
job: lot
config: {task: digits, teacher: cnn, epochs: 1}
variants: {a: {}}
"""


def test_a_trial_without_a_gpu_reservation_runs_on_the_cpu_even_where_cuda_is_visible():
    assert device_for({"device": "auto"}, gpus=0, cuda_available=True) == {"device": "cpu"}
    assert device_for({}, gpus=0, cuda_available=True) == {"device": "cpu"}
    assert device_for({"device": "auto"}, gpus=1, cuda_available=True) == {"device": "auto"}
    assert device_for({"device": "cuda:1"}, gpus=0, cuda_available=True) == {"device": "cuda:1"}  # asked for


def test_a_gpu_trial_on_a_cpu_torch_fails_fast_naming_the_field():
    with pytest.raises(RuntimeError, match=r"resources.gpus: 1 GPU\(s\) reserved, but torch .* has no CUDA"):
        device_for({"device": "auto"}, gpus=1, cuda_available=False)


def test_bf16_only_where_the_gpu_has_native_bf16():
    assert not native_bf16((7, 0)) and not native_bf16((7, 5))  # V100, T4: emulated
    assert native_bf16((8, 0)) and native_bf16((9, 0))  # A100, H100
    assert not uses_bf16(torch.device("cpu"), "auto") and uses_bf16(torch.device("cpu"), "bf16")


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ("{gpus: 0.5, workers: 2}", "would put several NCCL ranks on one GPU"),
        ("{gpus: 2}", "a worker drives one GPU"),
    ],
)
def test_gpu_requests_that_cannot_work_are_refused(resources, expected):
    with pytest.raises(SpecError, match=expected):
        parse_spec(SPEC + f"resources: {resources}\n")
    parse_spec(SPEC + "resources: {gpus: 0.5}\n")  # a fraction of one GPU per single-worker trial is fine
    parse_spec(SPEC + "resources: {gpus: 1, workers: 2}\n")


def test_the_lstm_runs_in_float32_under_autocast():
    from teachsweep import models, tasks

    model = models.build_model("lstm:1", tasks.load_task("bbc_news_lm_2k"), 0)
    batch = {"input_ids": torch.randint(0, 100, (2, 8))}
    seen = []
    model.lstm.register_forward_hook(lambda m, args, out: seen.append(out[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(batch)
    assert seen == [torch.float32]
    assert logits.shape == (2, 8, 2000)


@pytest.mark.integration
def test_gpu_sweeps_on_a_cluster_without_gpus_yet_must_say_how_many_trials_to_run(ray_session):
    """An autoscaling cluster shows no GPU before it grows: sizing concurrency from it would run one trial at a
    time, so the spec has to give max_concurrent_trials."""
    from teachsweep.preflight import max_concurrency

    with pytest.raises(SpecError, match="max_concurrent_trials: the cluster shows 0 GPUs now"):
        max_concurrency(parse_spec(SPEC + "resources: {gpus: 1}\n"))
    assert max_concurrency(parse_spec(SPEC + "resources: {gpus: 1}\nmax_concurrent_trials: 3\n")) == 3
    assert max_concurrency(parse_spec(SPEC)) == 4  # CPU trials: from the session's 4 logical CPUs


@pytest.mark.integration
def test_a_trial_this_machines_ray_can_never_place_is_refused_before_anything_is_created(
    ray_session, tmp_path, monkeypatch
):
    """Tune would wait forever for a trial larger than a one-machine Ray (4 logical CPUs in the test session, no
    GPU); a cluster named by RAY_ADDRESS may grow, so there the request goes through."""
    from teachsweep.preflight import check_trial_fits
    from teachsweep.sweep import paths_for, run_sweep

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cases = {
        "{cpus: 8}": "resources.cpus: a trial needs 8 CPUs (1 worker(s) x 8)",
        "{cpus: 2, workers: 2}": "resources.cpus: a trial needs 4.01 CPUs (2 worker(s) x 2 + the driver)",
        "{gpus: 1}": "resources.gpus: a trial needs 1 GPUs",
    }
    for resources, message in cases.items():
        with pytest.raises(SpecError, match=re.escape(message)):
            check_trial_fits(parse_spec(SPEC + f"resources: {resources}\n"))
    check_trial_fits(parse_spec(SPEC + "resources: {cpus: 1, workers: 2}\n"))  # 2.01 of 4: fits
    check_trial_fits(parse_spec(SPEC + "resources: {cpus: 4}\n"))

    text = SPEC + f"resources: {{cpus: 8}}\nresults_dir: {tmp_path}\n"
    with pytest.raises(SpecError, match="resources.cpus"):
        run_sweep(parse_spec(text), text)
    assert not paths_for(parse_spec(text)).path.exists()  # no study, no Tune state, no fingerprint

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a cluster: its autoscaler may add what the trial asks for
    check_trial_fits(parse_spec(SPEC + "resources: {cpus: 8}\n"))


@pytest.mark.parametrize(("name", "task_name"), [("tiny-bert", "rotten_tomatoes"), ("vit:2", "digits")])
def test_jobs_that_never_read_attention_run_fused_attention_with_the_same_outputs(name, task_name):
    """LoT and the teacher job switch their models to SDPA (2x FLOP utilisation on an H100); the function
    is unchanged, and the explainers' models stay explainable."""
    task = tasks.load_task(task_name)
    model = models.build_model(name, task, seed=0).eval()
    if task.kind == "text":
        encoded = models.load_tokenizer(name)(
            ["a fine film", "dull and long , far too long"], padding=True, return_tensors="pt"
        )
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    else:
        batch = {"pixel_values": torch.randn(3, *task.image_shape)}
    with torch.no_grad():
        explainable = model(batch)[0]
        fast = models.use_fast_attention(model)(batch)[0]
    implementations = {m.config._attn_implementation for m in model.modules() if isinstance(m, PreTrainedModel)}
    assert implementations == {"sdpa"} and torch.allclose(fast, explainable, atol=1e-5)
    rebuilt = models.build_model(name, task, seed=0)  # how an explainer or a frozen teacher is built
    assert {m.config._attn_implementation for m in rebuilt.modules() if isinstance(m, PreTrainedModel)} == {
        models.EXPLAINABLE_ATTENTION
    }
