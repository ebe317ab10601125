"""The CUDA paths, on a GPU (skipped without one; bash scripts/gpu_check.sh runs them): Bi-WKV against the float64
oracle in float32 and under bf16 / fp16 autocast, scalematch.py's training step under bf16 and under fp16 with the
gradient scaler, SyncBatchNorm under torchrun, training, resuming and evaluation (three modes and multi-scale CIF)
through the user-facing commands, and a checkpoint written on the GPU read where there is none."""
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

import scalematch
from conftest import REPO, command_env, run, train, train_command
from dataset.semi import build_val_dataset
from eval import load_trained_model
from model import build_model
from model.rwkv import bi_wkv, bi_wkv_reference
from test_rwkv import FORWARD_TOLERANCE, GRAD_TOLERANCE, KINDS, gradients, make_inputs, relative_error
from test_trainer import batch_of, config
from util.inference import center_crop, predict_probs
from util.evaluation import autocast_dtype

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
# Unit roundoff, the largest relative rounding error: bf16 keeps 8 significant bits, fp16 11 (float32 24).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
# SyncBatchNorm over 2 processes against BatchNorm over the whole batch, both float32 without TF32: only the order
# of the sums differs (~1e-6 relative).
SYNC_TOLERANCE = 1e-4
# Largest difference of log-probabilities over their spread (see log_probability_difference), GPU against CPU. float32
# with cuDNN's TF32 off differs in the order of sums only (~1e-5). fp16 autocast as eval.py runs it: on the CPU it
# measured 0.6e-3 to 1.4e-3 on these checkpoints (bf16 5e-3 to 1.4e-2, noise in place of the logits 3 to 4).
FLOAT32_TOLERANCE = 1e-3
FP16_TOLERANCE = 2e-2
EVAL_SETTINGS = {"original": ("original", None), "center_crop": ("center_crop", None),
                 "sliding_window": ("sliding_window", None), "multiscale_cif": ("original", (0.5, 2.0))}


# ---------------------------------------------------------------------------------------------------------------------
# Bi-WKV


@pytest.mark.parametrize("kind", KINDS)
def test_bi_wkv_float32_matches_the_float64_oracle(kind):
    inputs = make_inputs(kind, 2, 300, 6, seed=1)
    grad_y = torch.randn(2, 300, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    on_gpu = tuple(x.to(CUDA, torch.float32) for x in inputs)
    y = bi_wkv(*on_gpu)
    assert y.device.type == "cuda" and y.dtype == torch.float32
    assert relative_error(y.cpu(), bi_wkv_reference(*inputs), inputs[3]) <= FORWARD_TOLERANCE[torch.float32]
    expected = gradients(bi_wkv_reference, inputs, grad_y)
    for name, actual, reference in zip("wukv", gradients(bi_wkv, on_gpu, grad_y.to(CUDA)), expected):
        assert relative_error(actual.cpu(), reference, reference) <= GRAD_TOLERANCE[name], name


def test_bi_wkv_float32_at_the_token_count_of_a_513_crop():
    """T = 129^2 (the stride-4 grid of a 513 crop), which CUDA computes in one piece with 129-token chunks; the oracle
    on sampled rows, and the gradients of a loss on those rows."""
    num_tokens, channels = 129 ** 2, 32
    inputs = make_inputs("uniform", 1, num_tokens, channels, seed=3)
    g = torch.Generator().manual_seed(4)
    rows = torch.cat((torch.tensor([0, num_tokens - 1]), torch.randperm(num_tokens, generator=g)[:62])).unique()
    grad_rows = torch.randn(1, len(rows), channels, generator=g).double()
    leaves = [x.detach().requires_grad_() for x in inputs]
    expected_y = bi_wkv_reference(*leaves, rows)
    expected_grads = torch.autograd.grad(expected_y, leaves, grad_rows)
    on_gpu = [x.to(CUDA, torch.float32).requires_grad_() for x in inputs]
    y = bi_wkv(*on_gpu)
    grad_y = torch.zeros_like(y)
    grad_y[:, rows.to(CUDA)] = grad_rows.to(CUDA, torch.float32)
    grads = torch.autograd.grad(y, on_gpu, grad_y)
    assert relative_error(y[:, rows.to(CUDA)].cpu(), expected_y, inputs[3]) <= FORWARD_TOLERANCE[torch.float32]
    for name, actual, reference in zip("wukv", grads, expected_grads):
        assert relative_error(actual.cpu(), reference, reference) <= GRAD_TOLERANCE[name], name


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_bi_wkv_under_autocast(dtype):
    """Under autocast, k and v come from Linear layers in the autocast dtype and w, u are float32 parameters; bi_wkv
    computes in float32. Given the rounded inputs it meets the float32 bounds; k's and v's gradients return in the
    autocast dtype, one rounding (at most the unit roundoff) more."""
    w, u, k, v = make_inputs("normal", 2, 300, 6, seed=5)
    given = (w.float(), u.float(), k.to(dtype), v.to(dtype))
    exact = tuple(x.double() for x in given)  # what bi_wkv is given, exactly
    grad_y = torch.randn(2, 300, 6, generator=torch.Generator().manual_seed(6))
    leaves = [x.to(CUDA).requires_grad_() for x in given]
    with torch.autocast("cuda", dtype=dtype):
        y = bi_wkv(*leaves)
    grads = torch.autograd.grad(y, leaves, grad_y.to(CUDA))
    assert y.dtype == torch.float32
    assert relative_error(y.cpu(), bi_wkv_reference(*exact), exact[3]) <= FORWARD_TOLERANCE[torch.float32]
    roundoff = UNIT_ROUNDOFF[dtype]
    for name, actual, reference in zip("wukv", grads, gradients(bi_wkv_reference, exact, grad_y.double())):
        rounded = name in "kv"
        assert actual.dtype == (dtype if rounded else torch.float32), name
        tolerance = GRAD_TOLERANCE[name] + (roundoff if rounded else 0.0)
        assert relative_error(actual.cpu(), reference, reference) <= tolerance, name
    # Against the unrounded inputs: moving the keys by at most delta scales every weight exp(G) by at most
    # exp(+-delta), the normalised weights by exp(+-2 delta), so y by at most expm1(2 delta) max|v|; rounding v
    # moves y by at most max|v_rounded - v|.
    delta = (exact[2] - k).abs().max().item()
    bound = math.expm1(2 * delta) + ((exact[3] - v).abs().max() / v.abs().max()).item()
    assert relative_error(y.cpu(), bi_wkv_reference(w, u, k, v), v) <= bound + FORWARD_TOLERANCE[torch.float32]


# ---------------------------------------------------------------------------------------------------------------------
# The training step


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_scalematch_steps_under_autocast(dtype):
    """scalematch.train_step on a GPU: the loss terms under autocast, the loss of Eq. 17, backward, optimizer step and
    update through the GradScaler (enabled for float16 only, as in training), until ten steps were applied."""
    cfg = config(lr=0.05, lr_multi=1.0, img_scales=[0.5, 2.0], conf_thresh=0.95,
                 amp_dtype=str(dtype).removeprefix("torch."))
    assert autocast_dtype(cfg, CUDA) == dtype
    torch.manual_seed(0)
    random.seed(0)
    model = build_model(cfg).to(CUDA).train()
    run = scalematch.Run(cfg, model, scalematch.build_optimizer(cfg, model), CUDA, total_iters=10_000,
                         scaler=torch.amp.GradScaler("cuda", enabled=dtype == torch.float16), amp_dtype=dtype)
    conv_dtypes = set()
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda module, inputs, output: conv_dtypes.add(output.dtype))
    losses, applied, with_gradient = [], 0, set()
    # fp16's scaler starts at 2^16 and halves its scale at each step whose gradients overflow, skipping that step:
    # ten skips bring it to 64.
    while applied < 10 and len(losses) < 20:
        output = scalematch.train_step(run, batch_of(), epoch=0)
        # scaler.step unscaled the gradients in place; a non-finite one made it skip the step.
        named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
        if all(torch.isfinite(grad).all() for _, grad in named):
            applied += 1
            with_gradient |= {name for name, grad in named if grad.abs().sum() > 0}
        losses.append(output.loss.item())
    assert conv_dtypes == {dtype}
    assert all(math.isfinite(value) for value in losses), losses
    assert applied == 10 and (dtype == torch.float16 or len(losses) == 10), f"{applied} of {len(losses)} applied"
    assert [name for name, _ in model.named_parameters() if name not in with_gradient] == []
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses


# ---------------------------------------------------------------------------------------------------------------------
# SyncBatchNorm under torchrun


@pytest.mark.parametrize("backend, processes", [("gloo", 2), ("nccl", 1)])
def test_sync_batch_norm_under_torchrun(backend, processes, tmp_path):
    """Two processes on the one GPU synchronise BatchNorm over gloo (NCCL refuses two processes on one device); one
    NCCL process runs DDP and SyncBatchNorm's NCCL collectives. Predictions, gradients and running statistics match
    plain BatchNorm on the whole batch in one process."""
    out = tmp_path / "differences.json"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
         "tests/sync_bn_worker.py", backend, str(out)])
    differences = json.loads(out.read_text())
    assert differences.pop("world_size") == processes
    assert max(differences.values()) <= SYNC_TOLERANCE, differences


# ---------------------------------------------------------------------------------------------------------------------
# Training, resuming and evaluation through scripts/train.sh and eval.py


FP16 = ["amp=true", "amp_dtype=float16"]


@pytest.fixture(scope="module")
def gpu_run(tiny_voc, tmp_path_factory):
    """(exp dir, run dir) of one epoch trained on the GPU by scripts/train.sh with fp16 autocast and the scaler."""
    exp_dir = tmp_path_factory.mktemp("exp")
    train(tiny_voc, exp_dir, 1, *FP16, "epochs=1", "run_name=gpu")
    return exp_dir, os.path.join(exp_dir, "pascal", "tiny", "gpu")


def copy_of_run(gpu_run, tmp_path) -> str:
    """An exp dir holding a copy of the GPU run, to continue without changing the original."""
    exp_dir = tmp_path / "exp"
    shutil.copytree(gpu_run[0], exp_dir)
    return str(exp_dir)


def without_gpu(command: list[str]) -> subprocess.CompletedProcess:
    """``command`` in a process that sees no GPU."""
    result = subprocess.run(command, cwd=REPO, env=dict(command_env(), CUDA_VISIBLE_DEVICES=""), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def test_training_on_the_gpu_writes_the_scaler_and_cuda_states(gpu_run):
    _, run_dir = gpu_run
    log = open(os.path.join(run_dir, "train.log")).read()
    assert "1 process(es) on cuda" in log and "amp torch.float16" in log
    state = torch.load(os.path.join(run_dir, "latest.pth"), map_location="cpu", weights_only=True)
    assert state["iteration"] == 2 and state["scaler"]["scale"] > 0
    assert "cuda" in state["processes"][0]["rng"]


def test_rerunning_resumes_on_the_gpu(gpu_run, tiny_voc, tmp_path):
    exp_dir = copy_of_run(gpu_run, tmp_path)
    result = train(tiny_voc, exp_dir, 1, *FP16, "epochs=2", "run_name=gpu")
    assert "resumed from" in result.stdout + result.stderr
    state = torch.load(os.path.join(exp_dir, "pascal", "tiny", "gpu", "latest.pth"), map_location="cpu",
                       weights_only=True)
    assert state["iteration"] == 4


def test_a_gpu_checkpoint_is_evaluated_and_resumed_without_a_gpu(gpu_run, tiny_voc, tmp_path):
    checkpoint = os.path.join(gpu_run[1], "best.pth")
    evaluated = without_gpu([sys.executable, "eval.py", "--checkpoint", checkpoint])
    assert "mIoU" in evaluated.stdout
    exp_dir = copy_of_run(gpu_run, tmp_path)
    resumed = without_gpu(train_command(tiny_voc, exp_dir, 0, *FP16, "epochs=2", "run_name=gpu"))
    assert "resumed from" in resumed.stdout + resumed.stderr
    log = open(os.path.join(exp_dir, "pascal", "tiny", "gpu", "train.log")).read()
    assert "1 process(es) on cpu" in log


@pytest.mark.parametrize("setting", EVAL_SETTINGS)
def test_eval_on_the_gpu(gpu_run, setting):
    mode, cif_scales = EVAL_SETTINGS[setting]
    flags = ["--mode", mode] + (["--multiscale-cif"] if cif_scales else [])
    result = run([sys.executable, "eval.py", "--checkpoint", os.path.join(gpu_run[1], "best.pth"), *flags])
    assert 0 <= float(result.stdout.split("mIoU")[-1].split()[0]) <= 100


@pytest.mark.parametrize("setting", EVAL_SETTINGS)
def test_gpu_predictions_match_the_cpu(gpu_run, setting):
    """eval.py's class probabilities on the GPU against the CPU's, for each mode and multi-scale CIF: in float32
    (cuDNN's TF32 off) they agree to float32 precision; under the checkpoint's fp16 autocast, as eval.py runs, to
    fp16's."""
    mode, cif_scales = EVAL_SETTINGS[setting]
    checkpoint = os.path.join(gpu_run[1], "best.pth")
    on_gpu, cfg, _ = load_trained_model(checkpoint, CUDA)
    models = {"cuda": on_gpu, "cpu": load_trained_model(checkpoint, torch.device("cpu"))[0]}
    assert autocast_dtype(cfg, CUDA) == torch.float16
    val_set = build_val_dataset(cfg, cfg["splits_dir"])

    def probabilities(device: str, image: torch.Tensor) -> torch.Tensor:
        model = models[device]
        predict = model.predict if cif_scales is None else lambda x: model.predict_multiscale_cif(x, cif_scales)
        with torch.no_grad():
            return predict_probs(predict, image.to(device), mode, cfg["crop_size"]).cpu()

    for index in range(len(val_set)):
        sample = val_set[index]
        image = sample["image"][None]
        if mode == "center_crop":
            image, _ = center_crop(image, sample["mask"][None], cfg["crop_size"])
        on_cpu = probabilities("cpu", image)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            float32 = probabilities("cuda", image)
        with torch.autocast("cuda", dtype=torch.float16):
            fp16 = probabilities("cuda", image)
        assert log_probability_difference(float32, on_cpu) <= FLOAT32_TOLERANCE, index
        assert log_probability_difference(fp16, on_cpu) <= FP16_TOLERANCE, index


def log_probability_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |log actual - log expected| / (max log expected - min log expected): a network trained for two steps
    predicts nearly uniform probabilities, whose absolute differences would be small even for wrong ones."""
    log_expected = expected.log()
    return ((actual.log() - log_expected).abs().max() / (log_expected.max() - log_expected.min())).item()
